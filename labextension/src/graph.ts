/**
 * The pipeline graph as the sidebar draws it: tasks from the REST API, mapped tasks collapsed
 * into one group node per function, and a layered left-to-right layout (dagre).
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

const CHAR_WIDTH = 7;
const NODE_HEIGHT = 30;
const MAX_LABEL = 28;

/** Labels longer than the node holds end with an ellipsis. */
export function shortLabel(label: string): string {
  return label.length > MAX_LABEL ? label.slice(0, MAX_LABEL - 1) + '…' : label;
}

/** Place nodes in layers from left to right (dagre) and route the edges. */
export function layout(nodes: IViewNode[], edges: IViewEdge[]): ILayout {
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir: 'LR', nodesep: 12, ranksep: 40, marginx: 10, marginy: 10 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const n of nodes) {
    const text = n.group ? `${shortLabel(n.label)} (${n.keys.length}/${n.keys.length})` : shortLabel(n.label);
    const width = Math.max(60, text.length * CHAR_WIDTH + 20);
    g.setNode(n.id, { width, height: NODE_HEIGHT });
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
  return {
    nodes: placed,
    edges: routed,
    width: info.width ?? 0,
    height: info.height ?? 0
  };
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
