import { describe, expect, it } from 'vitest';
import {
  ITask,
  applyEvents,
  FONT_PX,
  MIN_SCALE,
  collapse,
  countStates,
  countsLine,
  direction,
  fitScale,
  groupMembers,
  downstream,
  groupState,
  layout,
  layoutKey,
  nodeSize,
  shortLabel,
  successor
} from '../src/graph';

function task(key: string, name: string, state: ITask['state'] = 'SUCCEEDED'): ITask {
  return { key, name, label: `${name}(${key})`, kind: 'python', state, attempts: 1, reason: null, error: null, cell: null };
}

// the pi example: 20 fraction tasks feeding one average
const fractions = Array.from({ length: 20 }, (_, i) => task(`f${i}`, 'fraction'));
const average = task('avg', 'average', 'WAITING');
const edges = fractions.map(f => ({ parent: f.key, child: 'avg', kind: 'data' }));

describe('collapse', () => {
  it('groups the mapped tasks of a function into one node with counts', () => {
    fractions[3].state = 'FAILED';
    const view = collapse([...fractions, average], edges);
    expect(view.nodes.map(n => n.id)).toEqual(['group:fraction', 'avg']);
    const group = view.nodes[0];
    expect(group.label).toBe('fraction ×20');
    expect(group.counts).toEqual({ SUCCEEDED: 19, FAILED: 1 });
    expect(group.state).toBe('FAILED');
    expect(group.keys).toHaveLength(20);
    expect(view.edges).toEqual([{ source: 'group:fraction', target: 'avg' }]);
    fractions[3].state = 'SUCCEEDED';
  });

  it('expands a group on request', () => {
    const view = collapse([...fractions, average], edges, new Set(['fraction']));
    expect(view.nodes).toHaveLength(21);
    expect(view.edges).toHaveLength(20);
  });

  it('drops edges inside a group', () => {
    const chain = [task('a', 'step'), task('b', 'step')];
    const view = collapse(chain, [{ parent: 'a', child: 'b', kind: 'data' }]);
    expect(view.nodes).toHaveLength(1);
    expect(view.edges).toEqual([]);
  });
});

describe('groupState', () => {
  it('shows what needs attention first', () => {
    expect(groupState({ SUCCEEDED: 5, RUNNING: 1 })).toBe('RUNNING');
    expect(groupState({ SUCCEEDED: 5 })).toBe('SUCCEEDED');
    expect(groupState({})).toBe('WAITING');
  });
});

describe('layout', () => {
  it('puts parents left of their children', () => {
    const view = collapse([...fractions, average], edges);
    const placed = layout(view.nodes, view.edges);
    const [group, avg] = placed.nodes;
    expect(group.x).toBeLessThan(avg.x);
    expect(placed.edges[0].points.length).toBeGreaterThan(1);
    expect(placed.width).toBeGreaterThan(avg.x);
  });

  it('lays out 2,000 tasks', () => {
    const many = Array.from({ length: 2000 }, (_, i) => task(`t${i}`, `fn${i % 50}`));
    const manyEdges = many.slice(1).map((t, i) => ({ parent: many[i].key, child: t.key, kind: 'data' }));
    const view = collapse(many, manyEdges);
    expect(view.nodes).toHaveLength(50);
    expect(layout(view.nodes, view.edges).nodes).toHaveLength(50);
  });
});

describe('applyEvents', () => {
  it('updates states and reports unknown tasks', () => {
    const tasks = new Map([average].map(t => [t.key, { ...t }]));
    const unknown = applyEvents(tasks, [
      { id: 1, time: 0, key: 'avg', state: 'RUNNING', message: null },
      { id: 2, time: 0, key: 'new', state: 'WAITING', message: null },
      { id: 3, time: 0, key: null, state: null, message: 'paused' }
    ]);
    expect(tasks.get('avg')?.state).toBe('RUNNING');
    expect(unknown).toEqual(['new']);
    expect(countStates(tasks.values())).toEqual({ RUNNING: 1 });
  });
});

describe('downstream', () => {
  it('finds everything a retry runs again', () => {
    const e = [
      { parent: 'a', child: 'b', kind: 'data' },
      { parent: 'b', child: 'c', kind: 'data' },
      { parent: 'x', child: 'c', kind: 'data' }
    ];
    expect([...downstream(['a'], e)].sort()).toEqual(['b', 'c']);
  });
});

describe('shortLabel', () => {
  it('ends long labels with an ellipsis', () => {
    expect(shortLabel('x'.repeat(40))).toHaveLength(28);
    expect(shortLabel('short')).toBe('short');
  });
});

describe('readable at the sidebar width', () => {
  it('lays a narrow graph out top to bottom and a wide one left to right', () => {
    expect(direction(250)).toBe('TB');
    expect(direction(479)).toBe('TB');
    expect(direction(800)).toBe('LR');
    expect(direction(0)).toBe('LR'); // not measured yet (hidden): the default
  });

  it('never scales labels below 11 px: the view scrolls instead', () => {
    for (const [layoutWidth, box] of [[12700, 250], [2000, 250], [400, 250], [300, 250], [100, 250]]) {
      const scale = fitScale(layoutWidth, box);
      expect(FONT_PX * scale).toBeGreaterThanOrEqual(11);
      expect(scale).toBeLessThanOrEqual(1.25);
    }
    expect(fitScale(500, 1000)).toBeGreaterThan(1); // a small graph is not shrunk
    expect(MIN_SCALE * FONT_PX).toBeGreaterThanOrEqual(11);
  });

  it('gives a number, never NaN, for empty layouts and hidden boxes', () => {
    for (const [w, b] of [[0, 250], [250, 0], [NaN, 250], [Infinity, 250], [-5, 100]]) {
      expect(Number.isFinite(fitScale(w, b))).toBe(true);
    }
    const empty = layout([], []);
    expect(Number.isFinite(empty.width) && Number.isFinite(empty.height)).toBe(true);
  });

  it('puts parents above their children top to bottom, within the sidebar width', () => {
    const pi = [task('load', 'load'), task('stats', 'stats'), ...fractions, task('pi', 'pi', 'WAITING')];
    const piEdges = [
      { parent: 'load', child: 'stats', kind: 'data' },
      ...fractions.map(f => ({ parent: f.key, child: 'pi', kind: 'data' }))
    ];
    const view = collapse(pi, piEdges);
    const placed = layout(view.nodes, view.edges, 'TB');
    const at = new Map(placed.nodes.map(n => [n.id, n]));
    expect(at.get('load')!.y).toBeLessThan(at.get('stats')!.y);
    expect(at.get('group:fraction')!.y).toBeLessThan(at.get('pi')!.y);
    // the pi pipeline fits 250 px at a readable scale
    expect(placed.width * fitScale(placed.width, 246)).toBeLessThanOrEqual(246);
    expect(fitScale(placed.width, 246) * FONT_PX).toBeGreaterThanOrEqual(11);
  });
});

describe('mapped groups', () => {
  it('count every state on the group node, attention first', () => {
    expect(countsLine({ SUCCEEDED: 290, FAILED: 5, RUNNING: 5 })).toBe('5 failed · 5 running · 290 done');
    expect(countsLine({ SUCCEEDED: 3 })).toBe('3 done');
    expect(countsLine({ KILLED: 1, UPSTREAM_FAILED: 2, PENDING: 3, WAITING: 4 })).toBe(
      '1 killed · 2 blocked · 3 queued · 4 waiting'
    );
    expect(countsLine({})).toBe('');
  });

  it('size the group node for its count line, and lay out again only when its length changes', () => {
    const many = Array.from({ length: 300 }, (_, i) => task(`m${i}`, 'fraction', 'RUNNING'));
    const quiet = collapse(many, []);
    many.slice(0, 100).forEach(t => (t.state = 'FAILED'));
    many.slice(100, 200).forEach(t => (t.state = 'SUCCEEDED'));
    const busy = collapse(many, []);
    expect(nodeSize(busy.nodes[0]).width).toBeGreaterThanOrEqual(countsLine(busy.nodes[0].counts).length * 7);
    expect(layoutKey(busy.nodes, [], 'TB')).not.toBe(layoutKey(quiet.nodes, [], 'TB'));
    many[0].state = 'KILLED'; // same line length ("100 failed" -> "99 failed · 1 killed" is longer)
    many[1].state = 'FAILED';
    const again = collapse(many, []);
    expect(nodeSize(again.nodes[0]).width).toBeGreaterThanOrEqual(countsLine(again.nodes[0].counts).length * 7);
    // a single task's state change never changes the layout
    const single = [task('a', 'a'), task('b', 'b')];
    const before = layoutKey(collapse(single, []).nodes, [], 'LR');
    single[0].state = 'FAILED';
    expect(layoutKey(collapse(single, []).nodes, [], 'LR')).toBe(before);
  });

  it('list a group in graph order', () => {
    const mixed = [task('a0', 'f'), task('x', 'other'), task('a1', 'f'), task('a2', 'f')];
    expect(groupMembers(mixed, 'f').map(t => t.key)).toEqual(['a0', 'a1', 'a2']);
  });
});

describe('successor', () => {
  const tasks = (list: ITask[]) => new Map(list.map(t => [t.key, t]));

  it('keeps the same key while it is there', () => {
    const t = task('k1', 'checked');
    expect(successor(tasks([t]), { ...t })).toBe(t);
  });

  it('follows a re-run cell to its new key by the cell', () => {
    const old = { ...task('old', 'checked'), cell: 'cell-3' };
    const now = { ...task('new', 'checked_renamed'), cell: 'cell-3' };
    expect(successor(tasks([task('other', 'x'), now]), old)?.key).toBe('new');
  });

  it('follows an edited function call to its new key by the label', () => {
    const old = task('old', 'fraction');
    const now = { ...task('new', 'fraction'), label: old.label };
    expect(successor(tasks([task('z', 'zz'), now]), old)?.key).toBe('new');
  });

  it('gives nothing when the task is gone', () => {
    expect(successor(tasks([task('z', 'zz')]), task('old', 'gone'))).toBeNull();
  });
});
