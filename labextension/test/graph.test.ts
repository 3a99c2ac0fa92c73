import { describe, expect, it } from 'vitest';
import {
  ITask,
  applyEvents,
  collapse,
  countStates,
  downstream,
  groupState,
  layout,
  shortLabel
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
