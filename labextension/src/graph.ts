/**
 * The pipeline graph as the sidebar draws it: tasks from the REST API, mapped tasks collapsed
 * into one group node per function (its items shown as an ordered grid on demand), and a
 * layered layout (dagre): left to right where there is room, top to bottom where it is narrow,
 * at a scale that keeps labels readable (the view scrolls instead of shrinking them).
 *
 * Pure functions of plain data, with no JupyterLab imports, so they are unit tested alone.
 */
import dagre from '@dagrejs/dagre';

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

/** Place nodes in layers (dagre), left to right or top to bottom, and route the edges. */
export function layout(nodes: IViewNode[], edges: IViewEdge[], rankdir: Direction = 'LR'): ILayout {
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir, nodesep: rankdir === 'LR' ? 12 : 10, ranksep: rankdir === 'LR' ? 40 : 28, marginx: 8, marginy: 8 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const n of nodes) {
    g.setNode(n.id, nodeSize(n));
  }
  for (const e of edges) {
    g.setEdge(e.source, e.target);
  }
  dagre.layout(g);
  const placed = nodes.map(n => {
    const p = g.node(n.id);
    return { ...n, x: p.x, y: p.y, width: p.width, height: p.height };
  });
  const routed = edges.map(e => ({
    source: e.source,
    target: e.target,
    points: g.edge(e.source, e.target).points ?? []
  }));
  const info = g.graph();
  const finite = (v: number | undefined) => (v !== undefined && isFinite(v) && v > 0 ? v : 0);
  return {
    nodes: placed,
    edges: routed,
    width: finite(info.width),
    height: finite(info.height)
  };
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
    }
  }
  return unknown;
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
