/**
 * The pipeline graph as the sidebar draws it: tasks from the REST API, mapped tasks collapsed
 * into one group node per function (its items shown as an ordered grid on demand), and a
 * layered layout (dagre): left to right where there is room, top to bottom where it is narrow,
 * at a scale that keeps labels readable (the view scrolls instead of shrinking them).
 *
 * Pure functions of plain data, with no JupyterLab imports, so they are unit tested alone.
 */
import { GraphNode, coordGreedy, decrossDfs, decrossTwoLayer, graph as dagGraph, layeringLongestPath, sugiyama } from 'd3-dag';

/** Task states, as the store records them. */
export type State =
  | 'WAITING'
  | 'PENDING'
  | 'RUNNING'
  | 'SUCCEEDED'
  | 'FAILED'
  | 'UPSTREAM_FAILED'
  | 'KILLED';

export const STATES: State[] = [
  'WAITING',
  'PENDING',
  'RUNNING',
  'SUCCEEDED',
  'FAILED',
  'UPSTREAM_FAILED',
  'KILLED'
];

/** A task as `GET /nbpipe/api/graph` returns it. */
export interface ITask {
  key: string;
  name: string;
  label: string;
  kind: string;
  state: State;
  attempts: number;
  reason: string | null;
  error: string | null;
  cell: string | null;
  /** How it ended where the state does not say it all: 'timed out', 'accepted', 'adopted'. */
  outcome?: string | null;
}

/** An edge between two task keys. */
export interface IEdge {
  parent: string;
  child: string;
  kind: string;
}

/** A state change as `GET /nbpipe/api/events` returns it. */
export interface IEvent {
  id: number;
  time: number;
  key: string | null;
  state: string | null;
  message: string | null;
  /** The task's outcome when it ended in this state (timed out, accepted, adopted). */
  outcome?: string | null;
}

/** A node of the drawn graph: one task, or a group of a function's mapped tasks. */
export interface IViewNode {
  id: string;
  label: string;
  state: State;
  /** Task keys this node stands for (one for a task). */
  keys: string[];
  /** Tasks by state (groups only; a task has its own state). */
  counts: Partial<Record<State, number>>;
  group: boolean;
  name: string;
}

export interface IViewEdge {
  source: string;
  target: string;
}

export interface IPlacedNode extends IViewNode {
  x: number;
  y: number;
  width: number;
  height: number;
}

export interface ILayout {
  nodes: IPlacedNode[];
  edges: { source: string; target: string; points: { x: number; y: number }[] }[];
  width: number;
  height: number;
}

/** The state a group shows: what most needs attention among its tasks. */
const ATTENTION: State[] = [
  'FAILED',
  'RUNNING',
  'PENDING',
  'KILLED',
  'UPSTREAM_FAILED',
  'WAITING',
  'SUCCEEDED'
];

export function groupState(counts: Partial<Record<State, number>>): State {
  return ATTENTION.find(s => (counts[s] ?? 0) > 0) ?? 'WAITING';
}

/**
 * Collapse the tasks of each function that has more than one (a map, a loop of calls) into a
 * group node `group:<name>`, unless the name is in `expanded`. Edges follow their tasks; edges
 * inside a group and duplicates disappear.
 */
export function collapse(
  tasks: ITask[],
  edges: IEdge[],
  expanded: ReadonlySet<string> = new Set()
): { nodes: IViewNode[]; edges: IViewEdge[] } {
  const byName = new Map<string, ITask[]>();
  for (const t of tasks) {
    const list = byName.get(t.name);
    if (list) {
      list.push(t);
    } else {
      byName.set(t.name, [t]);
    }
  }
  const nodeOf = new Map<string, string>();
  const nodes: IViewNode[] = [];
  for (const [name, members] of byName) {
    if (members.length > 1 && !expanded.has(name)) {
      const id = `group:${name}`;
      const counts: Partial<Record<State, number>> = {};
      for (const m of members) {
        counts[m.state] = (counts[m.state] ?? 0) + 1;
        nodeOf.set(m.key, id);
      }
      nodes.push({
        id,
        label: `${name} ×${members.length}`,
        state: groupState(counts),
        keys: members.map(m => m.key),
        counts,
        group: true,
        name
      });
    } else {
      for (const m of members) {
        nodeOf.set(m.key, m.key);
        nodes.push({
          id: m.key,
          label: m.label,
          state: m.state,
          keys: [m.key],
          counts: { [m.state]: 1 },
          group: false,
          name
        });
      }
    }
  }
  const seen = new Set<string>();
  const viewEdges: IViewEdge[] = [];
  for (const e of edges) {
    const source = nodeOf.get(e.parent);
    const target = nodeOf.get(e.child);
    if (!source || !target || source === target) {
      continue;
    }
    const id = `${source}\u0000${target}`;
    if (!seen.has(id)) {
      seen.add(id);
      viewEdges.push({ source, target });
    }
  }
  return { nodes, edges: viewEdges };
}

const CHAR_WIDTH = 7.2; // of the 12 px label font
const NODE_HEIGHT = 30;
const GROUP_HEIGHT = 44; // two lines: the name and the counts by state
const MAX_LABEL = 28;

/** The label font size in px at scale 1 (style/index.css sets the same). */
export const FONT_PX = 12;
/** The smallest scale Fit uses: labels stay at least 11 px high; the view scrolls instead. */
export const MIN_SCALE = 0.95;
/** The largest scale Fit uses (a 3-node graph is not blown up). */
export const MAX_SCALE = 1.25;
/** Below this width (px) the graph is laid out top to bottom. */
export const NARROW = 480;

export type Direction = 'LR' | 'TB';

/** Labels longer than the node holds end with an ellipsis. */
export function shortLabel(label: string): string {
  return label.length > MAX_LABEL ? label.slice(0, MAX_LABEL - 1) + '…' : label;
}

/** Short names of states for count lines. */
const SHORT: Record<State, string> = {
  WAITING: 'waiting',
  PENDING: 'queued',
  RUNNING: 'running',
  SUCCEEDED: 'done',
  FAILED: 'failed',
  UPSTREAM_FAILED: 'blocked',
  KILLED: 'killed'
};

/** The order counts are written in: what needs attention first, done last. */
const COUNT_ORDER: State[] = ['FAILED', 'KILLED', 'UPSTREAM_FAILED', 'RUNNING', 'PENDING', 'WAITING', 'SUCCEEDED'];

/**
 * A group's counts by state as one short line, attention first: `2 failed · 5 running · 293 done`.
 */
export function countsLine(counts: Partial<Record<State, number>>): string {
  return COUNT_ORDER.filter(s => (counts[s] ?? 0) > 0)
    .map(s => `${counts[s]} ${SHORT[s]}`)
    .join(' · ');
}

/**
 * A node's width and height. A group's width holds its current count line, so the layout is
 * recomputed when that line's length changes (`layoutKey`), not on every state change.
 */
export function nodeSize(n: IViewNode): { width: number; height: number } {
  const text = shortLabel(n.label).length * CHAR_WIDTH;
  const counts = n.group ? countsLine(n.counts).length * CHAR_WIDTH : 0;
  const width = Math.ceil(Math.max(40, text, counts) + 20);
  return { width, height: n.group ? GROUP_HEIGHT : NODE_HEIGHT };
}

/** What the layout depends on: the nodes, the edges, and the length of each group's count line. */
export function layoutKey(nodes: IViewNode[], edges: IViewEdge[], rankdir: Direction): string {
  const groups = nodes.filter(n => n.group).map(n => `${n.id}:${countsLine(n.counts).length}`);
  return `${rankdir}|${nodes.length}|${nodes.map(n => n.id).join(',')}|${edges.length}|${groups.join(',')}`;
}

/** Left to right where `width` (px) has room for it, top to bottom where it is narrow. */
export function direction(width: number): Direction {
  return width > 0 && width < NARROW ? 'TB' : 'LR';
}

/**
 * The scale that fits a layout's width into `boxWidth` px, kept between MIN_SCALE (labels
 * stay readable: the view scrolls) and MAX_SCALE. A zero or unknown size gives 1, never NaN.
 */
export function fitScale(layoutWidth: number, boxWidth: number): number {
  if (!(layoutWidth > 0) || !(boxWidth > 0) || !isFinite(layoutWidth) || !isFinite(boxWidth)) {
    return 1;
  }
  return Math.min(MAX_SCALE, Math.max(MIN_SCALE, boxWidth / layoutWidth));
}

/** Where one connected part of the graph was placed, in its own coordinates (from 0, 0). */
export interface IPartPlacement {
  /** Node centres and sizes by node id. */
  nodes: Map<string, { x: number; y: number; width: number; height: number }>;
  edges: { source: string; target: string; points: { x: number; y: number }[] }[];
  width: number;
  height: number;
}

/**
 * Placements of connected parts kept between layouts, by what each part's layout depends on
 * (see `layout`): a graph that gains a task is laid out again only in the part it joined.
 */
export type LayoutCache = Map<string, IPartPlacement>;

/** Space between connected parts, and around the whole graph, in px. */
const PART_GAP = 16;
const MARGIN = 8;
/**
 * Connected parts are placed side by side across the flow (left to right when the graph flows
 * down, top to bottom when it flows right) and wrap after this many px, so that many small parts
 * make a block rather than one endless row.
 */
export const WRAP = 1600;

/**
 * The weakly connected parts of a graph, each in the order its nodes come in `nodes`, the parts
 * in the order of their first node (graph order, so the picture is stable).
 */
export function parts(nodes: IViewNode[], edges: IViewEdge[]): { nodes: IViewNode[]; edges: IViewEdge[] }[] {
  const index = new Map(nodes.map((n, i) => [n.id, i]));
  const root = nodes.map((_, i) => i);
  const find = (i: number): number => {
    while (root[i] !== i) {
      root[i] = root[root[i]]; // path halving keeps the trees flat
      i = root[i];
    }
    return i;
  };
  for (const e of edges) {
    const a = index.get(e.source);
    const b = index.get(e.target);
    if (a === undefined || b === undefined) {
      continue;
    }
    const ra = find(a);
    const rb = find(b);
    if (ra !== rb) {
      root[Math.max(ra, rb)] = Math.min(ra, rb); // the smaller index roots: the first node's part
    }
  }
  const byRoot = new Map<number, { nodes: IViewNode[]; edges: IViewEdge[] }>();
  nodes.forEach((n, i) => {
    const r = find(i);
    const part = byRoot.get(r);
    if (part) {
      part.nodes.push(n);
    } else {
      byRoot.set(r, { nodes: [n], edges: [] });
    }
  });
  for (const e of edges) {
    const a = index.get(e.source);
    if (a !== undefined && index.has(e.target)) {
      byRoot.get(find(a))?.edges.push(e);
    }
  }
  return [...byRoot.values()];
}

/** What a part's placement depends on: its direction, its nodes with their sizes, its edges. */
function partKey(part: { nodes: IViewNode[]; edges: IViewEdge[] }, rankdir: Direction): string {
  const nodes = part.nodes.map(n => {
    const size = nodeSize(n);
    return `${n.id}:${size.width}x${size.height}`;
  });
  const edges = part.edges.map(e => `${e.source}>${e.target}`);
  return `${rankdir}|${nodes.join(',')}|${edges.join(',')}`;
}

/** Where the segment from the centre of a `width` x `height` box towards `to` leaves the box. */
export function boxEdge(centre: { x: number; y: number }, width: number, height: number, to: { x: number; y: number }): { x: number; y: number } {
  const dx = to.x - centre.x;
  const dy = to.y - centre.y;
  if (dx === 0 && dy === 0) {
    return { ...centre };
  }
  // the side the segment crosses first: the smaller of the two scale factors
  const sx = dx === 0 ? Infinity : width / 2 / Math.abs(dx);
  const sy = dy === 0 ? Infinity : height / 2 / Math.abs(dy);
  const t = Math.min(sx, sy, 1);
  return { x: centre.x + dx * t, y: centre.y + dy * t };
}

/**
 * Parts bigger than this are ordered by one depth-first walk: the sweeps' crossing counts grow
 * with the square of a layer's width (a 1,000-task fan took seconds).
 */
const BIG_PART = 300;

/**
 * How a part's nodes are ordered within their layers. A tree (every node with at most one parent,
 * or at most one child: a chain, a fan-out, a fan-in) has an order without crossings that one
 * depth-first walk finds; other graphs get d3-dag's two-layer sweeps, big ones the walk only.
 */
function ordering(part: { nodes: IViewNode[]; edges: IViewEdge[] }) {
  const parents = new Map<string, number>();
  const children = new Map<string, number>();
  for (const e of part.edges) {
    parents.set(e.target, (parents.get(e.target) ?? 0) + 1);
    children.set(e.source, (children.get(e.source) ?? 0) + 1);
  }
  if ([...parents.values()].every(n => n <= 1)) {
    return decrossDfs();
  }
  if ([...children.values()].every(n => n <= 1)) {
    return decrossDfs().topDown(false);
  }
  return part.nodes.length > BIG_PART ? decrossDfs() : decrossTwoLayer();
}

/**
 * One connected part placed in layers (a lone node needs no layout). d3-dag's Sugiyama layout
 * with its fast operators (longest-path layers, `ordering` against crossings, greedy
 * coordinates): a 2,000-node graph takes a fraction of a second where dagre took seconds, and
 * a meshed one minutes. It lays out top to bottom; left to right is the same with the axes
 * swapped.
 */
function placePart(part: { nodes: IViewNode[]; edges: IViewEdge[] }, rankdir: Direction): IPartPlacement {
  const sizes = part.nodes.map(nodeSize);
  if (part.nodes.length === 1 && part.edges.length === 0) {
    const { width, height } = sizes[0];
    return { nodes: new Map([[part.nodes[0].id, { x: width / 2, y: height / 2, width, height }]]), edges: [], width, height };
  }
  const down = rankdir === 'TB';
  const g = dagGraph<number, undefined>();
  const made = part.nodes.map((_, i) => g.node(i));
  const index = new Map(part.nodes.map((n, i) => [n.id, i]));
  const links = part.edges.map(e => g.link(made[index.get(e.source) as number], made[index.get(e.target) as number], undefined));
  // sizes in the layout's own frame: across the flow first, along it second
  const frame = (i: number): [number, number] => (down ? [sizes[i].width, sizes[i].height] : [sizes[i].height, sizes[i].width]);
  const result = sugiyama()
    .layering(layeringLongestPath())
    .decross(ordering(part))
    .coord(coordGreedy())
    .nodeSize((node: GraphNode<number, undefined>) => frame(node.data))
    .gap(down ? [10, 28] : [12, 40])(g);
  const turn = (x: number, y: number) => (down ? { x, y } : { x: y, y: x });
  const nodes = new Map<string, { x: number; y: number; width: number; height: number }>();
  part.nodes.forEach((n, i) => {
    nodes.set(n.id, { ...turn(made[i].x, made[i].y), ...sizes[i] });
  });
  const edges = part.edges.map((e, i) => {
    const points = links[i].points.map(([x, y]) => turn(x, y));
    const from = nodes.get(e.source)!;
    const to = nodes.get(e.target)!;
    if (points.length >= 2) {
      // from the source's border to the target's border, so the arrowhead shows
      points[0] = boxEdge(from, from.width, from.height, points[1]);
      points[points.length - 1] = boxEdge(to, to.width, to.height, points[points.length - 2]);
    }
    return { source: e.source, target: e.target, points };
  });
  const size = turn(result.width, result.height);
  return { nodes, edges, width: size.x, height: size.y };
}

/**
 * Place nodes in layers, left to right or top to bottom, and route the edges.
 *
 * Each connected part is laid out alone (ordering against crossings costs more than linear time
 * in the size of the graph, and parts need none between them) and the parts are set side by side
 * across the flow, wrapping after WRAP px. With a `cache`, a part whose nodes,
 * sizes and edges are unchanged keeps its earlier placement; the cache is left holding only the
 * parts of this graph.
 */
export function layout(nodes: IViewNode[], edges: IViewEdge[], rankdir: Direction = 'LR', cache?: LayoutCache): ILayout {
  const used = new Map<string, IPartPlacement>();
  const placedNodes: IPlacedNode[] = [];
  const placedEdges: ILayout['edges'] = [];
  // `along` runs with the flow (down for TB, right for LR), `across` the other way
  const flowsDown = rankdir === 'TB';
  let across = MARGIN;
  let along = MARGIN;
  let shelf = 0; // the deepest part (along the flow) of the current row of parts
  let extentAcross = 0;
  const all = parts(nodes, edges);
  const placements = all.map(part => {
    const key = partKey(part, rankdir);
    const placement = used.get(key) ?? cache?.get(key) ?? placePart(part, rankdir);
    used.set(key, placement);
    return { part, placement };
  });
  const size = (p: IPartPlacement) => (flowsDown ? { across: p.width, along: p.height } : { across: p.height, along: p.width });
  const limit = placements.reduce((m, { placement }) => Math.max(m, size(placement).across), WRAP);
  for (const { part, placement } of placements) {
    const s = size(placement);
    if (across > MARGIN && across + s.across > MARGIN + limit) {
      across = MARGIN; // a new row of parts below (or a new column to the right)
      along += shelf + PART_GAP;
      shelf = 0;
    }
    const dx = flowsDown ? across : along;
    const dy = flowsDown ? along : across;
    for (const n of part.nodes) {
      const p = placement.nodes.get(n.id);
      if (p) {
        placedNodes.push({ ...n, x: p.x + dx, y: p.y + dy, width: p.width, height: p.height });
      }
    }
    for (const e of placement.edges) {
      placedEdges.push({ source: e.source, target: e.target, points: e.points.map(q => ({ x: q.x + dx, y: q.y + dy })) });
    }
    across += s.across + PART_GAP;
    extentAcross = Math.max(extentAcross, across - PART_GAP);
    shelf = Math.max(shelf, s.along);
  }
  if (cache) {
    cache.clear();
    for (const [key, placement] of used) {
      cache.set(key, placement);
    }
  }
  const extentAlong = placements.length ? along + shelf : MARGIN;
  const width = (flowsDown ? extentAcross : extentAlong) + MARGIN;
  const height = (flowsDown ? extentAlong : extentAcross) + MARGIN;
  return { nodes: placedNodes, edges: placedEdges, width: placements.length ? width : 0, height: placements.length ? height : 0 };
}

/** A rectangle in layout coordinates (px at scale 1). */
export interface IRect {
  x: number;
  y: number;
  width: number;
  height: number;
}

/** The part of the layout a scrolled box shows: its scroll offset and size divided by the scale. */
export function viewport(scrollLeft: number, scrollTop: number, boxWidth: number, boxHeight: number, scale: number): IRect {
  const s = scale > 0 && isFinite(scale) ? scale : 1;
  return { x: scrollLeft / s, y: scrollTop / s, width: boxWidth / s, height: boxHeight / s };
}

/**
 * The part of the layout to draw for a viewport: the viewport widened by `margin` times its
 * size on every side, so that scrolling less than that far needs no new drawing.
 */
export function drawWindow(view: IRect, margin = 1): IRect {
  return {
    x: view.x - view.width * margin,
    y: view.y - view.height * margin,
    width: view.width * (1 + 2 * margin),
    height: view.height * (1 + 2 * margin)
  };
}

/** Whether `inner` lies wholly inside `outer`. */
export function contains(outer: IRect, inner: IRect): boolean {
  return (
    inner.x >= outer.x &&
    inner.y >= outer.y &&
    inner.x + inner.width <= outer.x + outer.width &&
    inner.y + inner.height <= outer.y + outer.height
  );
}

/**
 * Whether the drawn part must be drawn anew for a view: the view left it, or it is much bigger
 * than the view needs (drawn for a bigger box, or before the box had its size).
 */
export function redraw(window: IRect, view: IRect, margin = 1): boolean {
  const most = 1 + 2 * margin + 1; // one view's size of slack over what drawWindow gives
  return !contains(window, view) || window.width > view.width * most || window.height > view.height * most;
}

function overlaps(a: IRect, x0: number, y0: number, x1: number, y1: number): boolean {
  return x1 >= a.x && x0 <= a.x + a.width && y1 >= a.y && y0 <= a.y + a.height;
}

/**
 * The nodes and edges of a layout that touch `window` (a node by its box, an edge by the box of
 * its points): what a big graph draws, the rest being off screen.
 */
export function visible(placed: ILayout, window: IRect): { nodes: IPlacedNode[]; edges: ILayout['edges'] } {
  const nodes = placed.nodes.filter(n =>
    overlaps(window, n.x - n.width / 2, n.y - n.height / 2, n.x + n.width / 2, n.y + n.height / 2)
  );
  const edges = placed.edges.filter(e => {
    let x0 = Infinity;
    let y0 = Infinity;
    let x1 = -Infinity;
    let y1 = -Infinity;
    for (const p of e.points) {
      x0 = Math.min(x0, p.x);
      y0 = Math.min(y0, p.y);
      x1 = Math.max(x1, p.x);
      y1 = Math.max(y1, p.y);
    }
    return e.points.length > 0 && overlaps(window, x0, y0, x1, y1);
  });
  return { nodes, edges };
}

/** The tasks of a group node (a function's mapped calls) in graph order. */
export function groupMembers(tasks: ITask[], name: string): ITask[] {
  return tasks.filter(t => t.name === name);
}

/**
 * The task that now stands where `old` stood: the same key if it is still there, else the task
 * of the same cell, else of the same label (a re-run cell or an edited function gets a new key).
 */
export function successor(
  tasks: ReadonlyMap<string, ITask>,
  old: { key: string; label: string; name: string; cell: string | null }
): ITask | null {
  const same = tasks.get(old.key);
  if (same) {
    return same;
  }
  const all = [...tasks.values()];
  if (old.cell) {
    const byCell = all.filter(t => t.cell === old.cell);
    if (byCell.length === 1) {
      return byCell[0];
    }
    const named = byCell.find(t => t.label === old.label);
    if (named) {
      return named;
    }
  }
  return all.find(t => t.label === old.label) ?? null;
}

/**
 * Apply state changes to tasks (in place). Returns the keys it did not know: new tasks, which
 * call for reloading the whole graph.
 */
export function applyEvents(tasks: Map<string, ITask>, events: IEvent[]): string[] {
  const unknown: string[] = [];
  for (const e of events) {
    if (!e.key || !e.state) {
      continue;
    }
    const task = tasks.get(e.key);
    if (!task) {
      unknown.push(e.key);
      continue;
    }
    if ((STATES as string[]).includes(e.state)) {
      task.state = e.state as State;
      // a new state ends the old outcome (a timed-out task retried is no longer timed out)
      task.outcome = e.outcome ?? null;
    }
  }
  return unknown;
}

/**
 * A task's state as the list and the panel write it: the state, and how it ended where the
 * state alone would mislead ('FAILED (timed out)', 'SUCCEEDED (accepted)').
 */
export function stateText(state: State, outcome?: string | null): string {
  return outcome ? `${state} (${outcome})` : state;
}

/** What a task's outcome means, for a tooltip; '' for none. */
export function outcomeTitle(outcome?: string | null): string {
  switch (outcome) {
    case 'timed out':
      return 'stopped: it ran longer than its timeout';
    case 'accepted':
      return 'accepted by hand: its last successful result is kept (retry to run it again)';
    case 'adopted':
      return 'adopted: its declared output files existed and were trusted, not made';
    default:
      return outcome ?? '';
  }
}

/** Counts of tasks by state. */
export function countStates(tasks: Iterable<ITask>): Partial<Record<State, number>> {
  const counts: Partial<Record<State, number>> = {};
  for (const t of tasks) {
    counts[t.state] = (counts[t.state] ?? 0) + 1;
  }
  return counts;
}

/** Keys of the tasks downstream of `keys` (what a retry of them also runs again). */
export function downstream(keys: string[], edges: IEdge[]): Set<string> {
  const children = new Map<string, string[]>();
  for (const e of edges) {
    const list = children.get(e.parent);
    if (list) {
      list.push(e.child);
    } else {
      children.set(e.parent, [e.child]);
    }
  }
  const out = new Set<string>();
  const todo = [...keys];
  while (todo.length) {
    const key = todo.pop() as string;
    for (const child of children.get(key) ?? []) {
      if (!out.has(child)) {
        out.add(child);
        todo.push(child);
      }
    }
  }
  return out;
}
