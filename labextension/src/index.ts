/**
 * The nbpipe JupyterLab extension: a left sidebar with the active notebook's pipeline.
 */
import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, ReactWidget, showDialog, Dialog } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';
import * as React from 'react';
import { Sidebar } from './components/Sidebar';
import { requestAPI } from './api';
import { SidebarModel } from './model';

/** The sidebar's stable DOM id (tests and `app.shell.activateById` use it). */
export const SIDEBAR_ID = 'nbpipe-sidebar';

export const CommandIDs = {
  open: 'nbpipe:open-sidebar',
  openMain: 'nbpipe:open-main-area',
  export: 'nbpipe:export-notebook'
};

/** The current text of the cell with `cellId` in any open notebook (null when none has it). */
function cellSource(tracker: INotebookTracker, cellId: string): string | null {
  let found: string | null = null;
  tracker.forEach(panel => {
    if (found !== null) {
      return;
    }
    for (const cell of panel.content.widgets) {
      if (cell.model.id === cellId) {
        found = cell.model.sharedModel.getSource();
        return;
      }
    }
  });
  return found;
}

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">
<circle cx="5" cy="6" r="2.5"/><circle cx="5" cy="18" r="2.5"/><circle cx="19" cy="12" r="2.5"/>
<path d="M7 7 L17 11.2 L17 12.8 L7 17 L7 15.3 L14.2 12 L7 8.7 Z"/></g></svg>`;

export const nbpipeIcon = new LabIcon({ name: 'nbpipe:graph', svgstr: ICON_SVG });

/** Scroll a notebook to the cell with `cellId` and highlight it for a moment. */
function showCell(tracker: INotebookTracker, cellId: string): boolean {
  const panels: NotebookPanel[] = [];
  if (tracker.currentWidget) {
    panels.push(tracker.currentWidget);
  }
  tracker.forEach(p => {
    if (p !== tracker.currentWidget) {
      panels.push(p);
    }
  });
  for (const panel of panels) {
    // one marked cell at a time: the one asked for last
    panel.content.widgets.forEach(cell => cell.removeClass('nbpipe-highlight'));
  }
  for (const panel of panels) {
    const notebook = panel.content;
    const index = notebook.widgets.findIndex(cell => cell.model.id === cellId);
    if (index < 0) {
      continue;
    }
    notebook.activeCellIndex = index;
    const cell = notebook.widgets[index];
    void notebook.scrollToItem(index, 'center');
    // a highlight of its own (not JupyterLab's selection colour), for a few seconds
    cell.removeClass('nbpipe-highlight');
    void cell.node.offsetWidth; // restart the animation when the same cell is shown again
    cell.addClass('nbpipe-highlight');
    window.setTimeout(() => cell.removeClass('nbpipe-highlight'), 3000);
    return true;
  }
  return false;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'nbpipe:sidebar',
  description: 'The live task graph of the notebook pipeline, with retry, kill, pause and resume.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILabShell, ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    labShell: ILabShell | null,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const model = new SidebarModel();
    model.cellSource = (id: string) => cellSource(tracker, id);
    const onShowCell = (id: string) => showCell(tracker, id);
    const widget = ReactWidget.create(React.createElement(Sidebar, { model, onShowCell }));
    widget.id = SIDEBAR_ID;
    widget.title.icon = nbpipeIcon;
    widget.title.caption = 'nbpipe pipeline';
    widget.addClass('nbpipe-sidebar');
    app.shell.add(widget, 'left', { rank: 600 });
    // after a reload the sidebar is open again if it was (its width is the shell's to restore)
    restorer?.add(widget, SIDEBAR_ID);

    // The notebook in focus decides the pipeline (unless one is pinned in the picker). Only a
    // notebook counts: focusing the sidebar, a terminal or a file keeps the last notebook's.
    const follow = () => {
      const path = tracker.currentWidget?.context.path;
      if (path === undefined) {
        if (!model.path && !model.selected) {
          void model.setPath('');
        }
        return;
      }
      if (path !== model.path) {
        void model.setPath(path);
      }
    };
    tracker.currentChanged.connect(follow);
    labShell?.currentChanged.connect(follow);
    tracker.forEach(panel => panel.context.pathChanged.connect(follow));
    tracker.widgetAdded.connect((_, panel) => panel.context.pathChanged.connect(follow));
    void app.restored.then(() => {
      follow();
      model.start();
    });

    let main: MainAreaWidget<ReactWidget> | null = null;
    app.commands.addCommand(CommandIDs.openMain, {
      label: 'Open the nbpipe pipeline in the main area',
      execute: () => {
        if (!main || main.isDisposed) {
          const content = ReactWidget.create(React.createElement(Sidebar, { model, onShowCell, main: true }));
          content.addClass('nbpipe-sidebar');
          main = new MainAreaWidget({ content });
          main.id = 'nbpipe-main';
          main.title.label = 'nbpipe pipeline';
          main.title.icon = nbpipeIcon;
          main.title.closable = true;
          app.shell.add(main, 'main', { mode: 'split-right' });
        }
        app.shell.activateById(main.id);
      }
    });
    palette?.addItem({ command: CommandIDs.openMain, category: 'nbpipe' });
    model.openMain = () => void app.commands.execute(CommandIDs.openMain);

    app.commands.addCommand(CommandIDs.open, {
      label: 'Show the nbpipe pipeline sidebar',
      execute: () => app.shell.activateById(SIDEBAR_ID)
    });
    palette?.addItem({ command: CommandIDs.open, category: 'nbpipe' });

    app.commands.addCommand(CommandIDs.export, {
      label: 'Export notebook to nbpipe script',
      caption: 'Write the notebook pipeline as a plain Python script that shares its results',
      isEnabled: () => tracker.currentWidget !== null,
      execute: async () => {
        const panel = tracker.currentWidget;
        if (!panel) {
          return;
        }
        await panel.context.save();  // the file on disk is what is exported
        try {
          const result = await requestAPI<{ script: string; tasks: string[]; warnings: string[] }>(
            'export',
            {},
            { method: 'POST', body: JSON.stringify({ path: panel.context.path }) }
          );
          const warnings = result.warnings.length ? `\n\nLeft out:\n${result.warnings.join('\n')}` : '';
          await showDialog({
            title: 'Exported',
            body: `Wrote ${result.script} (${result.tasks.length} task cells).${warnings}`,
            buttons: [Dialog.okButton()]
          });
          await app.commands.execute('docmanager:open', { path: result.script });
        } catch (e) {
          await showDialog({ title: 'Export failed', body: (e as Error).message, buttons: [Dialog.okButton()] });
        }
      }
    });
    palette?.addItem({ command: CommandIDs.export, category: 'nbpipe' });
    model.exportCommand = () => app.commands.execute(CommandIDs.export);
  }
};

export default plugin;
