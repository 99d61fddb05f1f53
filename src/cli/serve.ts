// `blockmirror serve`: one export, sparse memory unless --file. The server itself is in
// serve-run.ts, loaded when the command runs.
import type { Command } from 'commander';
import { DEFAULT_PORT } from '../protocol/constants.js';
import { UsageError } from './errors.js';
import { cliLogger } from './logger.js';
import { addTlsOptions, type TlsCliOptions } from './tls-options.js';

export interface ServeOptions extends TlsCliOptions {
  size?: string;
  file?: string;
  name: string;
  listen?: string;
  socket?: string;
  readOnly?: boolean;
  description?: string;
  iscsi?: string;
  iscsiTarget: string;
  iscsiChapFile?: string;
  iscsiAllow?: string[];
  iscsiPortal?: string[];
}

export function serveCommand(program: Command): void {
  const command = program
    .command('serve')
    .description('export one volume over NBD (memory-backed unless --file)')
    .option('--size <size>', 'export size, e.g. 512, 64KiB, 256MiB, 1GiB (required unless --file names an existing file)')
    .option('--file <path>', 'back the export with a sparse file (created if missing)')
    .option('--name <name>', 'export name (the default export "" maps to it too)', 'disk')
    .option('--listen <host:port>', `TCP address to listen on (default 127.0.0.1:${DEFAULT_PORT} unless --socket is given)`)
    .option('--socket <path>', 'listen on a unix socket')
    .option('--read-only', 'refuse writes (EPERM)')
    .option('--description <text>', 'export description shown by nbdinfo and LIST', '')
    .option('--iscsi <host:port>', 'also serve the same device as LUN 0 of an iSCSI target (port 3260 by default)')
    .option('--iscsi-target <iqn>', 'iSCSI target name', 'iqn.2026-12.org.blockmirror:serve')
    .option('--iscsi-chap-file <path>', 'require CHAP: the file holds "USER:SECRET", and a second line "USER:SECRET" for mutual CHAP')
    .option('--iscsi-portal <host:port...>', 'more iSCSI listen addresses for the same target (multipath)')
    .option('--iscsi-allow <entry...>', 'initiators allowed to log in: IQN patterns (* wildcard) and CIDRs');
  addTlsOptions(command).action(async (opts: ServeOptions, cmd: Command) => {
      const log = await cliLogger(cmd);
      const { serve } = await import('./serve-run.js');
      await serve(opts, log);
    });
}

export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text) ?? /^()()(\d+)$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new UsageError(`invalid --listen "${text}" (expected HOST:PORT, e.g. 127.0.0.1:10809)`);
  }
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
}
