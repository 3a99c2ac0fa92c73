/**
 * The sidebar panel: pipeline picker, summary, graph, task list and the selected task's panel.
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import * as React from 'react';
import { IAttempt, ITaskDetail } from '../api';
import { ITask, STATES, State, downstream, outcomeTitle, stateText } from '../graph';
import { SidebarModel } from '../model';
import { GraphView } from './GraphView';

export interface ISidebarProps {
  model: SidebarModel;
  /** Scroll the notebook to the cell that defines a task (and highlight it). */
  onShowCell: (cellId: string) => boolean;
  /** True for the full-size tab ("Open in main area"). */
  main?: boolean;
}

function useModel(model: SidebarModel): number {
  const [, setVersion] = React.useState(model.version);
  React.useEffect(() => {
    const update = () => setVersion(model.version);
    model.changed.connect(update);
    return () => {
      model.changed.disconnect(update);
    };
  }, [model]);
  return model.version;
}

function elapsed(started: number | undefined): string {
  if (!started) {
    return '';
  }
  const seconds = Math.max(0, Math.round(Date.now() / 1000 - started));
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

/** Re-render every second while `on` (a clock that ticks while nothing else changes). */
function useTick(on: boolean): void {
  const [, setTick] = React.useState(0);
  React.useEffect(() => {
    if (!on) {
      return;
    }
    const timer = window.setInterval(() => setTick(t => t + 1), 1000);
    return () => window.clearInterval(timer);
  }, [on]);
}

function Summary(props: { model: SidebarModel }): JSX.Element | null {
  const { graph } = props.model;
  useTick(!!graph?.runner);
  if (!graph) {
    return null;
  }
  const total = props.model.tasks.size;
  const counts = graph.counts;
  const finished = (counts.SUCCEEDED ?? 0) + (counts.FAILED ?? 0) + (counts.UPSTREAM_FAILED ?? 0) + (counts.KILLED ?? 0);
  return (
    <div className="nbpipe-summary">
      <div className="nbpipe-counts">
        {STATES.filter(s => counts[s]).map(s => (
          <span key={s} className={`nbpipe-badge nbpipe-state-${s}`} data-count-state={s}>
            {counts[s]} {s.toLowerCase().replace('_', ' ')}
          </span>
        ))}
        {graph.paused && <span className="nbpipe-badge nbpipe-paused">paused</span>}
      </div>
      <div className="nbpipe-progress" role="progressbar" aria-valuemin={0} aria-valuemax={total} aria-valuenow={finished}>
        {STATES.filter(s => counts[s]).map(s => (
          <div key={s} className={`nbpipe-state-${s}`} style={{ width: `${(100 * (counts[s] ?? 0)) / Math.max(1, total)}%` }} />
        ))}
      </div>
      <div className="nbpipe-runner" data-runner-pid={graph.runner?.pid}>
        {graph.runner ? (
          <>
            runner pid {graph.runner.pid} on {graph.runner.host} ·{' '}
            <span className="nbpipe-uptime">{elapsed(graph.runner.started)}</span> · cluster {graph.runner.cluster}
            {graph.runner.dashboard && (
              <>
                {' '}
                ·{' '}
                <a href={graph.runner.dashboard} target="_blank" rel="noreferrer">
                  Dask dashboard
                </a>
              </>
            )}
          </>
        ) : (
          'no runner attached'
        )}
      </div>
    </div>
  );
}

/** One row of the task list. Memoised: a poll re-renders only the rows whose state changed. */
const TaskRow = React.memo(function TaskRow(props: {
  id: string;
  label: string;
  state: State;
  outcome?: string | null;
  chosen: boolean;
  onSelect: (key: string) => void;
}): JSX.Element {
  return (
    <li>
      <button
        className={`nbpipe-task-row${props.chosen ? ' nbpipe-selected' : ''}`}
        data-task={props.id}
        data-state={props.state}
        data-outcome={props.outcome ?? undefined}
        onClick={() => props.onSelect(props.id)}
      >
        <span className={`nbpipe-dot nbpipe-state-${props.state}`} />
        <span className="nbpipe-task-label" title={props.label}>
          {props.label}
        </span>
        <span className="nbpipe-task-state" title={outcomeTitle(props.outcome)}>
          {stateText(props.state, props.outcome)}
        </span>
      </button>
    </li>
  );
});

function TaskList(props: { model: SidebarModel; onSelect: (key: string) => void }): JSX.Element {
  // one stable callback for every row (so memoised rows stay memoised), calling the latest
  const selectRef = React.useRef(props.onSelect);
  selectRef.current = props.onSelect;
  const onSelect = React.useCallback((key: string) => selectRef.current(key), []);
  const [state, setState] = React.useState<State | ''>('');
  const [name, setName] = React.useState('');
  const tasks = [...props.model.tasks.values()].filter(
    t => (!state || t.state === state) && (!name || t.label.toLowerCase().includes(name.toLowerCase()))
  );
  return (
    <div className="nbpipe-list">
      <div className="nbpipe-filters">
        <select aria-label="filter by state" value={state} onChange={e => setState(e.target.value as State | '')}>
          <option value="">all states</option>
          {STATES.map(s => (
            <option key={s} value={s}>
              {s}
            </option>
          ))}
        </select>
        <input aria-label="filter by name" placeholder="filter by name" value={name} onChange={e => setName(e.target.value)} />
      </div>
      <ul>
        {tasks.slice(0, 500).map(t => (
          <TaskRow key={t.key} id={t.key} label={t.label} state={t.state} outcome={t.outcome} chosen={props.model.detail?.key === t.key} onSelect={onSelect} />
        ))}
        {tasks.length > 500 && <li className="nbpipe-more">{tasks.length - 500} more: narrow the filter</li>}
      </ul>
    </div>
  );
}

/** A duration as the notebook's status line writes it (one decimal). */
export function seconds(value: number): string {
  return `${value.toFixed(1)} s`;
}

function Attempt(props: { attempt: IAttempt }): JSX.Element {
  const a = props.attempt;
  return (
    <details className="nbpipe-attempt" open={a.state === 'FAILED'}>
      <summary>
        attempt {a.number}: {a.state}
        {a.seconds !== null ? ` in ${seconds(a.seconds)}` : ''}
        {a.hostname ? ` on ${a.hostname}` : ''}
        {a.job_id ? ` (job ${a.job_id})` : ''}
      </summary>
      <dl>
        {a.worker && (
          <>
            <dt>worker</dt>
            <dd>{a.worker}</dd>
          </>
        )}
        {a.python && (
          <>
            <dt>python</dt>
            <dd>{a.python}</dd>
          </>
        )}
        {a.git_commit && (
          <>
            <dt>git</dt>
            <dd>{a.git_commit.slice(0, 12)}</dd>
          </>
        )}
      </dl>
      {a.traceback && <pre className="nbpipe-traceback">{a.traceback}</pre>}
      {a.stdout && (
        <>
          <div className="nbpipe-stream">stdout</div>
          <pre>{a.stdout}</pre>
        </>
      )}
      {a.stderr && (
        <>
          <div className="nbpipe-stream">stderr</div>
          <pre>{a.stderr}</pre>
        </>
      )}
    </details>
  );
}

function TaskPanel(props: { model: SidebarModel; detail: ITaskDetail; onShowCell: (id: string) => boolean }): JSX.Element {
  const { model, detail } = props;
  const resources = Object.entries(detail.resources).filter(([, v]) => v !== null && v !== 0 && v !== undefined);
  const running = detail.state === 'RUNNING' || detail.state === 'PENDING';
  const kill = async () => {
    const answer = await showDialog({
      title: 'Kill task',
      body: `Stop ${detail.label}? It ends KILLED; tasks that need it do not run.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Kill' })]
    });
    if (answer.button.accept) {
      await model.send('kill', { tasks: [detail.key] });
    }
  };
  const blocked = downstream([detail.key], model.graph?.edges ?? []).size;
  return (
    <div className="nbpipe-panel" data-panel-task={detail.key} data-panel-label={detail.label}>
      <div className="nbpipe-panel-head">
        <span className={`nbpipe-dot nbpipe-state-${detail.state}`} />
        <b className="nbpipe-panel-label" title={detail.label}>
          {detail.label}
        </b>{' '}
        <span className="nbpipe-panel-state" data-outcome={detail.outcome ?? undefined} title={outcomeTitle(detail.outcome)}>
          {stateText(detail.state, detail.outcome)}
        </span>
        <button className="jp-Button nbpipe-small nbpipe-close" title="Close the task panel" aria-label="close" onClick={() => void model.showTask(null)}>
          ×
        </button>
      </div>
      {detail.cell_changed && (
        <div className="nbpipe-cell-changed" role="status">
          The cell has changed since this task was defined: Retry runs the old code. Run the cell to use the new code.
        </div>
      )}
      <div className="nbpipe-buttons">
        <button
          className="jp-Button nbpipe-retry"
          disabled={running}
          title={
            detail.cell_changed
              ? 'The cell has changed since this task was defined: Retry runs the old code; run the cell to use the new code'
              : `Run it again${blocked ? `, with the ${blocked} task(s) it blocks` : ''}`
          }
          onClick={() => void model.send('retry', { tasks: [detail.key] })}
        >
          Retry
        </button>
        <button className="jp-Button nbpipe-kill" disabled={!running && detail.state !== 'WAITING'} onClick={() => void kill()}>
          Kill
        </button>
        {detail.cell && (
          <button className="jp-Button nbpipe-show-cell" onClick={() => props.onShowCell(detail.cell as string)}>
            Show cell
          </button>
        )}
      </div>
      <div className="nbpipe-why">why it ran: {detail.reason ?? '-'}</div>
      {detail.error && <pre className="nbpipe-error">{detail.error}</pre>}
      {resources.length > 0 && (
        <div className="nbpipe-resources">resources: {resources.map(([k, v]) => `${k}=${v}`).join(', ')}</div>
      )}
      <div className="nbpipe-key" title={detail.key}>
        key <code>{detail.key}</code>
      </div>
      {[...detail.attempts].reverse().map(a => (
        <Attempt key={a.number} attempt={a} />
      ))}
    </div>
  );
}

export function Sidebar(props: ISidebarProps): JSX.Element {
  const { model } = props;
  useModel(model);
  const tasks: ITask[] = React.useMemo(() => [...model.tasks.values()], [model.graph, model.version]);
  const select = (key: string) => {
    void model.showTask(key);
    const task = model.tasks.get(key);
    if (task?.cell) {
      props.onShowCell(task.cell);
    }
  };
  const failed = (model.graph?.counts.FAILED ?? 0) + (model.graph?.counts.KILLED ?? 0);
  return (
    <div className={`nbpipe-sidebar-body${props.main ? ' nbpipe-main-body' : ''}`}>
      <div className="nbpipe-header">
        <select
          className={`nbpipe-picker${model.pinned ? ' nbpipe-pinned' : ''}`}
          aria-label="pipeline"
          title={
            model.selected
              ? `${model.selected.name} (${model.selected.store})${model.pinned ? ' — pinned' : ' — the pipeline of the notebook in focus'}`
              : 'pipelines'
          }
          value={model.selected ? `${model.selected.store}\u0000${model.selected.name}` : ''}
          onChange={e => {
            const choice = model.pipelines.find(p => `${p.store}\u0000${p.name}` === e.target.value);
            if (choice) {
              void model.select(choice, true);
            }
          }}
        >
          {!model.selected && (
            <option value="">{model.path.endsWith('.ipynb') ? 'this notebook has no pipeline yet' : 'no pipeline yet'}</option>
          )}
          {model.pipelines.map(p => (
            <option key={`${p.store}/${p.name}`} value={`${p.store}\u0000${p.name}`} title={`${p.name} (${p.store})`}>
              {p.name} ({p.store})
            </option>
          ))}
        </select>
        <button className="jp-Button nbpipe-small" title="Look for pipelines again" onClick={() => void model.refreshPipelines()}>
          ⟳
        </button>
        {model.exportCommand && model.path.endsWith('.ipynb') && (
          <button
            className="jp-Button nbpipe-small nbpipe-export"
            title="Export notebook to nbpipe script"
            onClick={() => void model.exportCommand?.()}
          >
            Export
          </button>
        )}
      </div>
      {model.pinned && (
        <div className="nbpipe-pin">
          📌 pinned: stays when you switch notebooks{' '}
          <button className="jp-Button nbpipe-small nbpipe-unpin" title="Follow the notebook in focus again" onClick={() => void model.unpin()}>
            Follow notebook
          </button>
        </div>
      )}
      {model.error && (
        <div className="nbpipe-message" role="alert">
          <span>{model.error}</span>
          <button className="jp-Button nbpipe-small nbpipe-close" title="Dismiss" aria-label="dismiss" onClick={() => model.dismissError()}>
            ×
          </button>
        </div>
      )}
      {!model.selected && (
        <div className="nbpipe-empty">
          {model.path.endsWith('.ipynb') ? (
            <>
              <b>{model.path.split('/').pop()}</b> has no pipeline yet: run it with <code>%load_ext nbpipe</code> and{' '}
              <code>%%task</code> cells and its pipeline shows here
              {model.pipelines.length > 0 && ' (the picker lists the other pipelines of this folder)'}.
            </>
          ) : (
            <>
              Run a notebook with <code>%load_ext nbpipe</code> and <code>%%task</code> cells: its pipeline shows here.
            </>
          )}
        </div>
      )}
      {model.selected && (
        <>
          <Summary model={model} />
          <div className="nbpipe-buttons">
            <button className="jp-Button nbpipe-retry-failed" disabled={!failed} onClick={() => void model.send('retry', { failed: true })}>
              Retry all failed
            </button>
            {model.graph?.paused ? (
              <button className="jp-Button nbpipe-resume" onClick={() => void model.send('resume')}>
                Resume
              </button>
            ) : (
              <button className="jp-Button nbpipe-pause" onClick={() => void model.send('pause')}>
                Pause
              </button>
            )}
          </div>
          <GraphView
            tasks={tasks}
            edges={model.graph?.edges ?? []}
            selected={model.detail?.key ?? null}
            onSelect={select}
            onOpenMain={props.main ? undefined : model.openMain ?? undefined}
          />
          {model.detail && <TaskPanel model={model} detail={model.detail} onShowCell={props.onShowCell} />}
          <TaskList model={model} onSelect={select} />
        </>
      )}
    </div>
  );
}
