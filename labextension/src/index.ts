/**
 * The nbpipe JupyterLab extension: a left sidebar with the active notebook's pipeline.
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, ReactWidget, showDialog, Dialog } from '@jupyterlab/apputils';
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
  export: 'nbpipe:export-notebook'
};

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
    const notebook = panel.content;
    const index = notebook.widgets.findIndex(cell => cell.model.id === cellId);
    if (index < 0) {
      continue;
    }
    notebook.activeCellIndex = index;
    const cell = notebook.widgets[index];
    void notebook.scrollToItem(index, 'center');
    cell.addClass('nbpipe-highlight');
    window.setTimeout(() => cell.removeClass('nbpipe-highlight'), 2000);
    return true;
  }
  return false;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'nbpipe:sidebar',
  description: 'The live task graph of the notebook pipeline, with retry, kill, pause and resume.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILabShell, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    labShell: ILabShell | null,
    palette: ICommandPalette | null
  ) => {
    const model = new SidebarModel();
    const widget = ReactWidget.create(
      React.createElement(Sidebar, { model, onShowCell: (id: string) => showCell(tracker, id) })
    );
    widget.id = SIDEBAR_ID;
    widget.title.icon = nbpipeIcon;
    widget.title.caption = 'nbpipe pipeline';
    widget.addClass('nbpipe-sidebar');
    app.shell.add(widget, 'left', { rank: 600 });

    const follow = () => {
      const path = tracker.currentWidget?.context.path ?? '';
      if (path !== model.path || !model.selected) {
        void model.setPath(path);
      }
    };
    tracker.currentChanged.connect(follow);
    labShell?.currentChanged.connect(follow);
    void app.restored.then(() => {
      follow();
      model.start();
    });

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
