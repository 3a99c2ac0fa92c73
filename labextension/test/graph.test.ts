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
  IRect,
  LayoutCache,
  WRAP,
  boxEdge,
  contains,
  drawWindow,
  layout,
  redraw,
  layoutKey,
  nodeSize,
  outcomeTitle,
  parts,
  shortLabel,
  stateText,
  successor,
  viewport,
  visible
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

  it('lays out 2,000 tasks', { timeout: 120_000 }, () => {
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

  it('carries the outcome a task ended with, and drops it when the state moves on', () => {
    const tasks = new Map([average].map(t => [t.key, { ...t }]));
    applyEvents(tasks, [{ id: 1, time: 0, key: 'avg', state: 'FAILED', message: null, outcome: 'timed out' }]);
    expect(tasks.get('avg')?.outcome).toBe('timed out');
    // retried: pending again, no longer timed out; then accepted by hand
    applyEvents(tasks, [{ id: 2, time: 0, key: 'avg', state: 'PENDING', message: null }]);
    expect(tasks.get('avg')?.outcome).toBeNull();
    applyEvents(tasks, [{ id: 3, time: 0, key: 'avg', state: 'SUCCEEDED', message: 'accepted by hand', outcome: 'accepted' }]);
    expect(stateText(tasks.get('avg')!.state, tasks.get('avg')!.outcome)).toBe('SUCCEEDED (accepted)');
  });
});

describe('stateText and outcomeTitle', () => {
  it('writes the state alone when the outcome is plain', () => {
    expect(stateText('SUCCEEDED')).toBe('SUCCEEDED');
    expect(stateText('FAILED', null)).toBe('FAILED');
    expect(outcomeTitle(null)).toBe('');
  });

  it.each([
    ['FAILED', 'timed out', 'FAILED (timed out)', 'timeout'],
    ['SUCCEEDED', 'accepted', 'SUCCEEDED (accepted)', 'by hand'],
    ['SUCCEEDED', 'adopted', 'SUCCEEDED (adopted)', 'existed']
  ] as const)('writes %s with outcome %s', (state, outcome, text, hint) => {
    expect(stateText(state, outcome)).toBe(text);
    expect(outcomeTitle(outcome)).toContain(hint);
  });

  it('shows an outcome it does not know as it is', () => {
    expect(stateText('FAILED', 'lost')).toBe('FAILED (lost)');
    expect(outcomeTitle('lost')).toBe('lost');
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

// the benchmark's worst case: 2,000 different functions in 40 chains of 50
function chains(n = 2000, width = 40) {
  const tasks = Array.from({ length: n }, (_, i) => task(`s${i}`, `step${i}`));
  const links = tasks.slice(width).map((t, i) => ({ parent: tasks[i].key, child: t.key, kind: 'data' }));
  return collapse(tasks, links);
}

function inside(r: IRect, n: { x: number; y: number; width: number; height: number }): boolean {
  return n.x + n.width / 2 >= r.x && n.x - n.width / 2 <= r.x + r.width && n.y + n.height / 2 >= r.y && n.y - n.height / 2 <= r.y + r.height;
}

describe('big graphs', () => {
  it('split into connected parts in graph order', () => {
    const view = chains(200, 4);
    const found = parts(view.nodes, view.edges);
    expect(found).toHaveLength(4);
    expect(found.map(p => p.nodes[0].id)).toEqual(['s0', 's1', 's2', 's3']);
    expect(found.every(p => p.nodes.length === 50 && p.edges.length === 49)).toBe(true);
    const lone = parts([view.nodes[0]], []);
    expect(lone).toHaveLength(1);
  });

  it('lay out every node once, parents before children, parts apart, within a wrapped width', { timeout: 120_000 }, () => {
    const view = chains();
    for (const dir of ['TB', 'LR'] as const) {
      const placed = layout(view.nodes, view.edges, dir);
      expect(placed.nodes).toHaveLength(2000);
      expect(new Set(placed.nodes.map(n => n.id)).size).toBe(2000);
      expect(placed.edges).toHaveLength(1960);
      const at = new Map(placed.nodes.map(n => [n.id, n]));
      const wrong: string[] = [];
      for (const e of placed.edges) {
        const a = at.get(e.source)!;
        const b = at.get(e.target)!;
        if (!(dir === 'TB' ? a.y < b.y : a.x < b.x)) {
          wrong.push(`${e.source} not before ${e.target}`);
        }
        // edges run from border to border: the arrowhead is not under the child's box
        const end = e.points[e.points.length - 1];
        if (!(Math.abs(end.x - b.x) <= b.width / 2 + 0.01 && Math.abs(end.y - b.y) <= b.height / 2 + 0.01)) {
          wrong.push(`${e.source}>${e.target} ends off the border`);
        }
      }
      for (const n of placed.nodes) {
        if (n.x - n.width / 2 < 0 || n.y - n.height / 2 < 0 || n.x + n.width / 2 > placed.width || n.y + n.height / 2 > placed.height) {
          wrong.push(`${n.id} outside the layout`);
        }
      }
      // no two boxes overlap (sorted sweep along x)
      const boxes = [...placed.nodes].sort((a, b) => a.x - a.width / 2 - (b.x - b.width / 2));
      for (let i = 0; i < boxes.length; i++) {
        for (let j = i + 1; j < boxes.length && boxes[j].x - boxes[j].width / 2 < boxes[i].x + boxes[i].width / 2; j++) {
          if (Math.abs(boxes[i].y - boxes[j].y) < (boxes[i].height + boxes[j].height) / 2) {
            wrong.push(`${boxes[i].id} overlaps ${boxes[j].id}`);
          }
        }
      }
      expect(wrong).toEqual([]);
      // many parts wrap into rows (columns) instead of one endless line
      expect(dir === 'TB' ? placed.width : placed.height).toBeLessThanOrEqual(WRAP + 100);
    }
  });

  it('lay out again only the parts whose shape changed', { timeout: 120_000 }, () => {
    const cache: LayoutCache = new Map();
    const view = chains(400, 4);
    const first = layout(view.nodes, view.edges, 'TB', cache);
    expect(cache.size).toBe(4);
    const kept = [...cache.values()];
    // a state change: nothing is laid out again
    const again = layout(view.nodes.map(n => ({ ...n, state: 'RUNNING' as const })), view.edges, 'TB', cache);
    expect([...cache.values()]).toEqual(kept);
    expect(again.nodes.map(n => [n.x, n.y])).toEqual(first.nodes.map(n => [n.x, n.y]));
    expect(again.nodes[0].state).toBe('RUNNING'); // the nodes are the new ones, placed as before
    // a task joins the first chain: only that part is new
    const extra = task('new', 'newstep');
    const grown = collapse(
      [...view.nodes.map(n => task(n.id, n.name)), extra],
      [...view.edges.map(e => ({ parent: e.source, child: e.target, kind: 'data' })), { parent: 's396', child: 'new', kind: 'data' }]
    );
    layout(grown.nodes, grown.edges, 'TB', cache);
    const now = [...cache.values()];
    expect(now.filter(p => kept.includes(p))).toHaveLength(3);
    expect(cache.size).toBe(4); // the old first part is dropped, not kept for ever
  });

  it('draw only what is in and around the view, and all of it', { timeout: 120_000 }, () => {
    const placed = layout(chains().nodes, chains().edges, 'TB');
    const view = viewport(0, 0, 250, 500, 1);
    const window = drawWindow(view);
    const drawn = visible(placed, window);
    expect(drawn.nodes.length).toBeGreaterThan(0);
    expect(drawn.nodes.length).toBeLessThan(200); // not 2,000
    // every node that touches the view is drawn, and nothing far away
    const ids = new Set(drawn.nodes.map(n => n.id));
    for (const n of placed.nodes) {
      if (inside(view, n)) {
        expect(ids.has(n.id)).toBe(true);
      }
      if (ids.has(n.id)) {
        expect(inside(window, n)).toBe(true);
      }
    }
    // scrolled to the last node laid out (the far end): the nodes there are drawn
    const end = placed.nodes.reduce((a, b) => (b.y + b.x > a.y + a.x ? b : a));
    const far = viewport(Math.max(0, end.x - 125), Math.max(0, end.y - 250), 250, 500, 1);
    const there = new Set(visible(placed, drawWindow(far)).nodes.map(n => n.id));
    const last = placed.nodes.filter(n => inside(far, n));
    expect(last.length).toBeGreaterThan(0);
    expect(last.every(n => there.has(n.id))).toBe(true);
    // every edge touching the view is drawn
    const edges = new Set(drawn.edges.map(e => `${e.source}>${e.target}`));
    for (const e of placed.edges) {
      if (e.points.some(p => p.x >= view.x && p.x <= view.x + view.width && p.y >= view.y && p.y <= view.y + view.height)) {
        expect(edges.has(`${e.source}>${e.target}`)).toBe(true);
      }
    }
    // the view at another scale covers the layout px the box shows
    expect(viewport(100, 200, 250, 500, 2)).toEqual({ x: 50, y: 100, width: 125, height: 250 });
    expect(viewport(0, 0, 250, 500, NaN).width).toBe(250);
  });

  it('draw anew only when the view leaves the drawn part', () => {
    const window = drawWindow({ x: 0, y: 0, width: 250, height: 500 });
    expect(window).toEqual({ x: -250, y: -500, width: 750, height: 1500 });
    expect(contains(window, { x: 200, y: 400, width: 250, height: 500 })).toBe(true);
    expect(contains(window, { x: 300, y: 0, width: 250, height: 500 })).toBe(false);
    expect(redraw(window, { x: 200, y: 400, width: 250, height: 500 })).toBe(false);
    expect(redraw(window, { x: 300, y: 0, width: 250, height: 500 })).toBe(true);
    // drawn for a bigger box (or before the box had its size): drawn again for the real one
    const big = drawWindow({ x: 0, y: 0, width: 1400, height: 900 });
    expect(redraw(big, { x: 0, y: 0, width: 250, height: 500 })).toBe(true);
  });

  it('end edges on the border of a box', () => {
    expect(boxEdge({ x: 0, y: 0 }, 100, 30, { x: 0, y: 100 })).toEqual({ x: 0, y: 15 });
    expect(boxEdge({ x: 0, y: 0 }, 100, 30, { x: 200, y: 0 })).toEqual({ x: 50, y: 0 });
    expect(boxEdge({ x: 0, y: 0 }, 100, 30, { x: 5, y: 5 })).toEqual({ x: 5, y: 5 }); // inside: unchanged
  });
});
