/**
 * The DAG as SVG in a scrolling box: nodes coloured by state, mapped tasks as one group node
 * with counts by state (click it for its items as an ordered grid), laid out for the space the
 * box has (top to bottom when narrow) at a scale that keeps labels readable. Fit, zoom buttons,
 * and a ResizeObserver that refits when the panel is resized or shown after a reload.
 *
 * Only what the box shows, and a box's size around it, is drawn: the SVG keeps the whole
 * graph's size (so the scroll bars are true) and scrolling past the drawn part draws the part
 * now in view. A state change re-renders the drawn nodes it changed; the layout is computed
 * again only when the graph's shape changes, and then only for the connected parts that changed.
 */
import * as React from 'react';
import {
  Direction,
  IEdge,
  ILayout,
  IPlacedNode,
  IRect,
  ITask,
  LayoutCache,
  State,
  MIN_SCALE,
  collapse,
  countsLine,
  direction,
  drawWindow,
  fitScale,
  groupMembers,
  layout,
  layoutKey,
  redraw,
  shortLabel,
  viewport,
  visible
} from '../graph';

export interface IGraphViewProps {
  tasks: ITask[];
  edges: IEdge[];
  selected: string | null;
  onSelect: (key: string) => void;
  /** Show the graph in a full-size tab (absent inside that tab). */
  onOpenMain?: () => void;
}

function path(points: { x: number; y: number }[]): string {
  return points.map((p, i) => `${i ? 'L' : 'M'}${p.x},${p.y}`).join(' ');
}

/** A mapped group's items in order, one coloured square each (hover: label; click: panel). */
export function GroupGrid(props: {
  name: string;
  tasks: ITask[];
  selected: string | null;
  onSelect: (key: string) => void;
  onClose: () => void;
}): JSX.Element {
  const members = groupMembers(props.tasks, props.name);
  const counts: Partial<Record<ITask['state'], number>> = {};
  for (const m of members) {
    counts[m.state] = (counts[m.state] ?? 0) + 1;
  }
  return (
    <div className="nbpipe-group-grid" data-group-grid={props.name}>
      <div className="nbpipe-group-head">
        <b>
          {props.name} ×{members.length}
        </b>
        <span className="nbpipe-group-counts">{countsLine(counts)}</span>
        <button className="jp-Button nbpipe-small nbpipe-close" title="Close the group's items" aria-label="close" onClick={props.onClose}>
          ×
        </button>
      </div>
      <div className="nbpipe-cells" role="list">
        {members.map((t, i) => (
          <button
            key={t.key}
            role="listitem"
            className={`nbpipe-cell nbpipe-state-${t.state}${props.selected === t.key ? ' nbpipe-selected' : ''}`}
            data-task={t.key}
            data-label={t.label}
            data-state={t.state}
            data-index={i}
            title={`${t.label}: ${t.state}`}
            aria-label={`${t.label}: ${t.state}`}
            onClick={() => props.onSelect(t.key)}
          />
        ))}
      </div>
    </div>
  );
}

/**
 * One node. Memoised: a state change re-renders the nodes it changed, not all 2,000 of a big
 * graph (the sidebar polls every 400 ms while tasks run).
 */
const GraphNode = React.memo(function GraphNode(props: {
  node: IPlacedNode;
  state: State;
  line: string;
  chosen: boolean;
  onActivate: (n: IPlacedNode) => void;
}): JSX.Element {
  const { node: n, state, line } = props;
  return (
    <g
      className={`nbpipe-node${props.chosen ? ' nbpipe-selected' : ''}`}
      data-task={n.group ? n.name : n.id}
      data-label={n.label}
      data-state={state}
      data-group={n.group ? 'true' : undefined}
      data-counts={n.group ? line : undefined}
      transform={`translate(${n.x - n.width / 2},${n.y - n.height / 2})`}
      tabIndex={0}
      role="button"
      aria-label={n.group ? `${n.label}: ${line}` : `${n.label}: ${state}`}
      onClick={() => props.onActivate(n)}
      onKeyDown={event => {
        if (event.key === 'Enter' || event.key === ' ') {
          event.preventDefault();
          props.onActivate(n);
        }
      }}
    >
      <title>{n.group ? `${n.label}: ${line} — click for its items` : `${n.label}: ${state}`}</title>
      <rect width={n.width} height={n.height} rx={6} className={`nbpipe-state-${state}`} />
      {n.group ? (
        <>
          <text x={n.width / 2} y={17} textAnchor="middle">
            {shortLabel(n.label)}
          </text>
          <text x={n.width / 2} y={34} textAnchor="middle" className="nbpipe-node-counts">
            {line}
          </text>
        </>
      ) : (
        <text x={n.width / 2} y={n.height / 2 + 4} textAnchor="middle">
          {shortLabel(n.label)}
        </text>
      )}
    </g>
  );
});

/** The view's size (px) assumed while the box is hidden and has none. */
const FALLBACK = { width: 1400, height: 900 };

export function GraphView(props: IGraphViewProps): JSX.Element {
  const [group, setGroup] = React.useState<string | null>(null);
  const boxRef = React.useRef<HTMLDivElement>(null);
  const [boxWidth, setBoxWidth] = React.useState(0);
  // the part of the layout drawn (layout px): the view and a view's size around it
  const [window_, setWindow] = React.useState<IRect>(() => drawWindow(viewport(0, 0, FALLBACK.width, FALLBACK.height, 1)));
  const windowRef = React.useRef(window_);
  windowRef.current = window_;
  const cache = React.useRef<LayoutCache>(new Map());
  // null: fit to the box (and refit when it is resized); a number: the user's zoom
  const [zoom, setZoom] = React.useState<number | null>(null);

  // The box's width decides the direction and the fit; follow it (reload, resize, shown again).
  React.useEffect(() => {
    const box = boxRef.current;
    if (!box) {
      return;
    }
    const measure = () => {
      setBoxWidth(Math.floor(box.clientWidth));
      followView();
    };
    measure();
    const observer = new ResizeObserver(measure);
    observer.observe(box);
    return () => observer.disconnect();
  }, []);
  const rankdir: Direction = direction(boxWidth);

  // The layout depends on the shape of the graph, not on states: recompute only when it changes.
  const view = collapse(props.tasks, props.edges);
  const shape = layoutKey(view.nodes, view.edges, rankdir);
  const placed: ILayout = React.useMemo(() => layout(view.nodes, view.edges, rankdir, cache.current), [shape]);
  const stateOf = new Map(props.tasks.map(t => [t.key, t.state]));
  const liveById = new Map(view.nodes.map(n => [n.id, n]));
  const scale = zoom ?? fitScale(placed.width, boxWidth - 4);
  const width = Math.ceil(placed.width * scale);
  const height = Math.ceil(placed.height * scale);
  const scaleRef = React.useRef(scale);
  scaleRef.current = scale;
  // Draw anew when the view leaves the drawn part (scrolled, resized, zoomed) or needs far less
  // of it; within it, nothing.
  function followView(): void {
    const box = boxRef.current;
    if (!box) {
      return;
    }
    const shown = box.clientWidth > 0 && box.clientHeight > 0;
    const now = viewport(
      box.scrollLeft,
      box.scrollTop,
      shown ? box.clientWidth : FALLBACK.width,
      shown ? box.clientHeight : FALLBACK.height,
      scaleRef.current
    );
    if (redraw(windowRef.current, now)) {
      setWindow(drawWindow(now));
    }
  }
  React.useEffect(followView, [scale, placed]);
  const drawn = React.useMemo(() => visible(placed, window_), [placed, window_]);

  React.useEffect(() => {
    if (group && !props.tasks.some(t => t.name === group)) {
      setGroup(null); // the group is gone (another pipeline)
    }
  }, [props.tasks, group]);

  const activate = (n: IPlacedNode) => {
    if (n.group) {
      setGroup(group === n.name ? null : n.name);
    } else {
      props.onSelect(n.keys[0]);
    }
  };
  // one stable callback for every node (so memoised nodes stay memoised), calling the latest
  const activateRef = React.useRef(activate);
  activateRef.current = activate;
  const onActivate = React.useCallback((n: IPlacedNode) => activateRef.current(n), []);
  const zoomBy = (factor: number) =>
    setZoom(Math.min(3, Math.max(MIN_SCALE, Math.round(scale * factor * 100) / 100)));

  return (
    <div className="nbpipe-graph" data-direction={rankdir} data-scale={scale.toFixed(3)}>
      <div className="nbpipe-graph-tools">
        <button className="jp-Button nbpipe-small nbpipe-fit" onClick={() => setZoom(null)} title="Fit the graph to the width of the panel">
          Fit
        </button>
        <button className="jp-Button nbpipe-small" onClick={() => zoomBy(1 / 1.25)} title="Zoom out (labels stay readable)" aria-label="zoom out" disabled={scale <= MIN_SCALE}>
          −
        </button>
        <button className="jp-Button nbpipe-small" onClick={() => zoomBy(1.25)} title="Zoom in" aria-label="zoom in" disabled={scale >= 3}>
          +
        </button>
        {props.onOpenMain && (
          <button className="jp-Button nbpipe-small nbpipe-open-main" onClick={props.onOpenMain} title="Open the pipeline in a full-size tab">
            Open in main area
          </button>
        )}
      </div>
      <div className="nbpipe-graph-box" ref={boxRef} onScroll={followView}>
        <svg
          className="nbpipe-graph-svg"
          role="img"
          aria-label="task graph"
          data-nodes={placed.nodes.length}
          data-drawn={drawn.nodes.length}
          width={Math.max(width, 1)}
          height={Math.max(height, 1)}
          viewBox={`0 0 ${Math.max(placed.width, 1)} ${Math.max(placed.height, 1)}`}
        >
          <defs>
            <marker id="nbpipe-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" orient="auto">
              <path d="M0,0 L10,5 L0,10 z" className="nbpipe-arrow" />
            </marker>
          </defs>
          <g>
            {drawn.edges.map(e => (
              <path key={`${e.source}-${e.target}`} d={path(e.points)} className="nbpipe-edge" markerEnd="url(#nbpipe-arrow)" />
            ))}
            {drawn.nodes.map(n => {
              const now = liveById.get(n.id);
              const state = n.group ? now?.state ?? n.state : stateOf.get(n.id) ?? n.state;
              const chosen = !!((props.selected && n.keys.includes(props.selected)) || (n.group && group === n.name));
              return (
                <GraphNode key={n.id} node={n} state={state} line={n.group ? countsLine(now?.counts ?? n.counts) : ''} chosen={chosen} onActivate={onActivate} />
              );
            })}
          </g>
        </svg>
      </div>
      {group && (
        <GroupGrid name={group} tasks={props.tasks} selected={props.selected} onSelect={props.onSelect} onClose={() => setGroup(null)} />
      )}
    </div>
  );
}
