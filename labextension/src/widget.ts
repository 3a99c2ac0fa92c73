/**
 * The inline graph for frontends without the sidebar (VS Code, Notebook 7): an anywidget
 * module, `%pipeline graph` in a kernel with ipywidgets. It shares the sidebar's graph model
 * and layout (graph.ts) and draws with the DOM alone (no React, no JupyterLab packages).
 */
import '../style/widget.css';
import { IEdge, ITask, LayoutCache, collapse, countsLine, groupMembers, layout, shortLabel } from './graph';

/** Each drawn graph's layout cache: a redraw for a state change lays nothing out again. */
const caches = new WeakMap<HTMLElement, LayoutCache>();

const SVG = 'http://www.w3.org/2000/svg';

interface IModel {
  get(name: 'tasks'): ITask[];
  get(name: 'edges'): IEdge[];
  get(name: 'pipeline'): string;
  get(name: 'following'): boolean;
  on(event: string, callback: () => void): void;
  off(event: string, callback: () => void): void;
}

function svg<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number>): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    node.setAttribute(k, String(v));
  }
  return node;
}

/** A mapped group's items in order: one coloured square each, the label on hover. */
function grid(tasks: ITask[], name: string, close: () => void): HTMLElement {
  const members = groupMembers(tasks, name);
  const counts: Record<string, number> = {};
  for (const m of members) {
    counts[m.state] = (counts[m.state] ?? 0) + 1;
  }
  const box = document.createElement('div');
  box.className = 'nbpipe-inline-grid';
  box.dataset.groupGrid = name;
  const head = document.createElement('div');
  head.textContent = `${name} ×${members.length}: ${countsLine(counts)} `;
  const button = document.createElement('button');
  button.textContent = '×';
  button.title = 'close';
  button.addEventListener('click', close);
  head.appendChild(button);
  const cells = document.createElement('div');
  cells.className = 'nbpipe-inline-cells';
  for (const t of members) {
    const cell = document.createElement('span');
    cell.className = `nbpipe-inline-cell nbpipe-state-${t.state}`;
    cell.dataset.label = t.label;
    cell.dataset.state = t.state;
    cell.title = `${t.label}: ${t.state}`;
    cells.appendChild(cell);
  }
  box.append(head, cells);
  return box;
}

/** Draw the graph into `el` (again on every change of the tasks); `open` holds the group shown as a grid. */
export function draw(
  el: HTMLElement,
  tasks: ITask[],
  edges: IEdge[],
  open: Set<string>,
  redraw: () => void,
  following = true
): void {
  const view = collapse(tasks, edges);
  let cache = caches.get(el);
  if (!cache) {
    cache = new Map();
    caches.set(el, cache);
  }
  const placed = layout(view.nodes, view.edges, 'LR', cache);
  const root = svg('svg', {
    class: 'nbpipe-inline-svg',
    width: Math.max(placed.width, 100),
    height: Math.max(placed.height, 40),
    viewBox: `0 0 ${Math.max(placed.width, 100)} ${Math.max(placed.height, 40)}`,
    role: 'img',
    'aria-label': 'task graph'
  });
  const defs = svg('defs', {});
  const marker = svg('marker', {
    id: 'nbpipe-inline-arrow',
    viewBox: '0 0 10 10',
    refX: 9,
    refY: 5,
    markerWidth: 6,
    markerHeight: 6,
    orient: 'auto'
  });
  marker.appendChild(svg('path', { d: 'M0,0 L10,5 L0,10 z', class: 'nbpipe-arrow' }));
  defs.appendChild(marker);
  root.appendChild(defs);
  for (const e of placed.edges) {
    root.appendChild(
      svg('path', {
        d: e.points.map((p, i) => `${i ? 'L' : 'M'}${p.x},${p.y}`).join(' '),
        class: 'nbpipe-edge',
        'marker-end': 'url(#nbpipe-inline-arrow)'
      })
    );
  }
  for (const n of placed.nodes) {
    const line = countsLine(n.counts);
    const g = svg('g', {
      class: 'nbpipe-node',
      'data-task': n.group ? n.name : n.id,
      'data-label': n.label,
      'data-state': n.state,
      'data-group': n.group ? 'true' : 'false',
      'data-counts': n.group ? line : '',
      transform: `translate(${n.x - n.width / 2},${n.y - n.height / 2})`
    });
    const title = svg('title', {});
    title.textContent = n.group ? `${n.label}: ${line} — click for its items` : `${n.label}: ${n.state}`;
    g.appendChild(title);
    g.appendChild(svg('rect', { width: n.width, height: n.height, rx: 6, class: `nbpipe-state-${n.state}` }));
    const text = svg('text', { x: n.width / 2, y: n.group ? 17 : n.height / 2 + 4, 'text-anchor': 'middle' });
    text.textContent = shortLabel(n.label);
    g.appendChild(text);
    if (n.group) {
      const counts = svg('text', { x: n.width / 2, y: 34, 'text-anchor': 'middle' });
      counts.textContent = line;
      g.appendChild(counts);
      g.addEventListener('click', () => {
        if (open.has(n.name)) {
          open.delete(n.name);
        } else {
          open.clear();
          open.add(n.name);
        }
        redraw();
      });
    }
    root.appendChild(g);
  }
  const counts = new Map<string, number>();
  for (const t of tasks) {
    counts.set(t.state, (counts.get(t.state) ?? 0) + 1);
  }
  const summary = document.createElement('div');
  summary.className = 'nbpipe-inline-summary';
  summary.textContent = [...counts].map(([s, c]) => `${c} ${s.toLowerCase().replace('_', ' ')}`).join(', ') || 'no tasks';
  const parts: HTMLElement[] = [summary];
  if (!following) {
    const note = document.createElement('div');
    note.className = 'nbpipe-inline-stopped';
    note.textContent = 'Not following the pipeline any more: run %pipeline graph again for a live graph.';
    parts.push(note);
  }
  const picture = document.createElement('div');
  picture.className = 'nbpipe-inline-graph';
  picture.appendChild(root);
  parts.push(picture);
  for (const name of open) {
    if (tasks.some(t => t.name === name)) {
      parts.push(grid(tasks, name, () => {
        open.delete(name);
        redraw();
      }));
    }
  }
  el.replaceChildren(...parts);
}

export default {
  render({ model, el }: { model: IModel; el: HTMLElement }): () => void {
    el.classList.add('nbpipe-inline');
    const open = new Set<string>();
    const redraw = () => draw(el, model.get('tasks'), model.get('edges'), open, redraw, model.get('following') !== false);
    redraw();
    for (const name of ['change:tasks', 'change:edges', 'change:following']) {
      model.on(name, redraw);
    }
    return () => {
      for (const name of ['change:tasks', 'change:edges', 'change:following']) {
        model.off(name, redraw);
      }
    };
  }
};
