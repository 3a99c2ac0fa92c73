/**
 * The DAG as SVG: nodes coloured by state, mapped tasks as group nodes (click to expand),
 * zoom and pan with the wheel and drag (d3-zoom), and a Fit button.
 */
import { select } from 'd3-selection';
import { ZoomBehavior, zoom, zoomIdentity } from 'd3-zoom';
import * as React from 'react';
import { IEdge, ILayout, ITask, collapse, layout, shortLabel } from '../graph';

export interface IGraphViewProps {
  tasks: ITask[];
  edges: IEdge[];
  selected: string | null;
  onSelect: (key: string) => void;
}

function path(points: { x: number; y: number }[]): string {
  return points.map((p, i) => `${i ? 'L' : 'M'}${p.x},${p.y}`).join(' ');
}

export function GraphView(props: IGraphViewProps): JSX.Element {
  const [expanded, setExpanded] = React.useState<Set<string>>(new Set());
  const svgRef = React.useRef<SVGSVGElement>(null);
  const layerRef = React.useRef<SVGGElement>(null);
  const zoomRef = React.useRef<ZoomBehavior<SVGSVGElement, unknown> | null>(null);

  // The layout depends on the shape of the graph, not on states: recompute only when it changes.
  const shape = React.useMemo(
    () => props.tasks.map(t => t.key).join(',') + '|' + props.edges.length + '|' + [...expanded].join(','),
    [props.tasks, props.edges, expanded]
  );
  const placed: ILayout = React.useMemo(() => {
    const view = collapse(props.tasks, props.edges, expanded);
    return layout(view.nodes, view.edges);
  }, [shape]);
  const stateOf = new Map(props.tasks.map(t => [t.key, t.state]));
  const live = collapse(props.tasks, props.edges, expanded).nodes;
  const liveById = new Map(live.map(n => [n.id, n]));

  const fit = React.useCallback(() => {
    const svg = svgRef.current;
    if (!svg || !zoomRef.current) {
      return;
    }
    const box = svg.getBoundingClientRect();
    const scale = Math.min(1.5, (box.width || 300) / (placed.width || 1), (box.height || 300) / (placed.height || 1));
    const transform = zoomIdentity
      .translate(((box.width || 300) - placed.width * scale) / 2, ((box.height || 300) - placed.height * scale) / 2)
      .scale(scale);
    select(svg).call(zoomRef.current.transform, transform);
  }, [placed]);

  React.useEffect(() => {
    const svg = svgRef.current;
    if (!svg) {
      return;
    }
    const behaviour = zoom<SVGSVGElement, unknown>()
      .scaleExtent([0.05, 4])
      .on('zoom', event => {
        layerRef.current?.setAttribute('transform', event.transform.toString());
      });
    zoomRef.current = behaviour;
    select(svg).call(behaviour);
    return () => {
      select(svg).on('.zoom', null);
    };
  }, []);

  React.useEffect(() => fit(), [placed]);

  const activate = (id: string, group: boolean, name: string, keys: string[]) => {
    if (group) {
      setExpanded(new Set([...expanded, name]));
    } else {
      props.onSelect(keys[0]);
    }
  };

  return (
    <div className="nbpipe-graph">
      <div className="nbpipe-graph-tools">
        <button className="jp-Button nbpipe-small" onClick={fit} title="Fit the graph to the panel">
          Fit
        </button>
        {expanded.size > 0 && (
          <button className="jp-Button nbpipe-small" onClick={() => setExpanded(new Set())} title="Collapse mapped tasks">
            Collapse groups
          </button>
        )}
      </div>
      <svg ref={svgRef} className="nbpipe-graph-svg" role="img" aria-label="task graph">
        <defs>
          <marker id="nbpipe-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" orient="auto">
            <path d="M0,0 L10,5 L0,10 z" className="nbpipe-arrow" />
          </marker>
        </defs>
        <g ref={layerRef}>
          {placed.edges.map(e => (
            <path key={`${e.source}-${e.target}`} d={path(e.points)} className="nbpipe-edge" markerEnd="url(#nbpipe-arrow)" />
          ))}
          {placed.nodes.map(n => {
            const now = liveById.get(n.id);
            const state = n.group ? now?.state ?? n.state : stateOf.get(n.id) ?? n.state;
            const counts = now?.counts ?? n.counts;
            const done = counts.SUCCEEDED ?? 0;
            return (
              <g
                key={n.id}
                className={`nbpipe-node${props.selected && n.keys.includes(props.selected) ? ' nbpipe-selected' : ''}`}
                data-task={n.group ? n.name : n.id}
                data-label={n.label}
                data-state={state}
                data-group={n.group ? 'true' : undefined}
                transform={`translate(${n.x - n.width / 2},${n.y - n.height / 2})`}
                tabIndex={0}
                role="button"
                aria-label={`${n.label}: ${state}`}
                onClick={() => activate(n.id, n.group, n.name, n.keys)}
                onKeyDown={event => {
                  if (event.key === 'Enter' || event.key === ' ') {
                    event.preventDefault();
                    activate(n.id, n.group, n.name, n.keys);
                  }
                }}
              >
                <title>{n.group ? `${n.label}: ${done}/${n.keys.length} succeeded — click to expand` : `${n.label}: ${state}`}</title>
                <rect width={n.width} height={n.height} rx={6} className={`nbpipe-state-${state}`} />
                <text x={n.width / 2} y={n.height / 2 + 4} textAnchor="middle">
                  {n.group ? `${shortLabel(n.label)} (${done}/${n.keys.length})` : shortLabel(n.label)}
                </text>
              </g>
            );
          })}
        </g>
      </svg>
    </div>
  );
}
