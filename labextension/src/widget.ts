/**
 * The inline graph for frontends without the sidebar (VS Code, Notebook 7): an anywidget
 * module, `%pipeline graph` in a kernel with ipywidgets. It shares the sidebar's graph model
 * and layout (graph.ts) and draws with the DOM alone (no React, no JupyterLab packages).
 */
import '../style/widget.css';
import { IEdge, ITask, collapse, layout, shortLabel } from './graph';

const SVG = 'http://www.w3.org/2000/svg';

interface IModel {
  get(name: 'tasks'): ITask[];
  get(name: 'edges'): IEdge[];
  get(name: 'pipeline'): string;
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

/** Draw the graph into `el` (again on every change of the tasks). */
export function draw(el: HTMLElement, tasks: ITask[], edges: IEdge[], expanded: Set<string>, redraw: () => void): void {
  const view = collapse(tasks, edges, expanded);
  const placed = layout(view.nodes, view.edges);
  const root = svg('svg', {
    class: 'nbpipe-inline-svg',
    width: Math.max(placed.width, 100),
    height: Math.max(placed.height, 40),
    viewBox: `0 0 ${Math.max(placed.width, 100)} ${Math.max(placed.height, 40)}`,
    role: 'img',
    'aria-label': 'task graph'
  });
  for (const e of placed.edges) {
    root.appendChild(svg('path', { d: e.points.map((p, i) => `${i ? 'L' : 'M'}${p.x},${p.y}`).join(' '), class: 'nbpipe-edge' }));
  }
  for (const n of placed.nodes) {
    const done = n.counts.SUCCEEDED ?? 0;
    const g = svg('g', {
      class: 'nbpipe-node',
      'data-task': n.group ? n.name : n.id,
      'data-label': n.label,
      'data-state': n.state,
      'data-group': n.group ? 'true' : 'false',
      transform: `translate(${n.x - n.width / 2},${n.y - n.height / 2})`
    });
    const title = svg('title', {});
    title.textContent = n.group ? `${n.label}: ${done}/${n.keys.length} succeeded — click to expand` : `${n.label}: ${n.state}`;
    g.appendChild(title);
    g.appendChild(svg('rect', { width: n.width, height: n.height, rx: 6, class: `nbpipe-state-${n.state}` }));
    const text = svg('text', { x: n.width / 2, y: n.height / 2 + 4, 'text-anchor': 'middle' });
    text.textContent = n.group ? `${shortLabel(n.label)} (${done}/${n.keys.length})` : shortLabel(n.label);
    g.appendChild(text);
    if (n.group) {
      g.addEventListener('click', () => {
        expanded.add(n.name);
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
  el.replaceChildren(summary, root);
}

export default {
  render({ model, el }: { model: IModel; el: HTMLElement }): () => void {
    el.classList.add('nbpipe-inline');
    const expanded = new Set<string>();
    const redraw = () => draw(el, model.get('tasks'), model.get('edges'), expanded, redraw);
    redraw();
    model.on('change:tasks', redraw);
    model.on('change:edges', redraw);
    return () => {
      model.off('change:tasks', redraw);
      model.off('change:edges', redraw);
    };
  }
};
