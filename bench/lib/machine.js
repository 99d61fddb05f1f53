// What the numbers were measured on: they mean little without it.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';

function cmdOut(cmd, args) {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return 'unknown';
  }
}

export function machineInfo() {
  let cpuModel = 'unknown';
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'));
    if (m) cpuModel = m[1].trim();
  } catch {
    // not Linux: leave it unknown
  }
  return {
    nproc: cmdOut('nproc', []),
    cpuModel,
    memGiB: (os.totalmem() / 2 ** 30).toFixed(1),
    kernel: `${os.type()} ${os.release()}`,
    node: process.version,
    fio: cmdOut('fio', ['--version']),
    nbdkit: cmdOut('nbdkit', ['--version']),
  };
}

/**
 * The code being measured: HEAD plus whether src/, bin/ or native/ differ
 * from it (others may be editing while the bench runs). Read-only git
 * calls; --no-optional-locks keeps `status` from refreshing the index.
 */
export function codeInfo(root) {
  const head = cmdOut('git', ['-C', root, 'rev-parse', '--short', 'HEAD']);
  const subject = cmdOut('git', ['-C', root, 'log', '-1', '--format=%s']);
  const status = cmdOut('git', ['-C', root, '--no-optional-locks', 'status', '--porcelain', '--', 'src', 'bin', 'native']);
  const changed = status === 'unknown' ? [] : status.split('\n').filter(Boolean).map((l) => l.slice(3));
  return { head, subject, changed };
}

/** Newest mtime under dir (ms): changes when someone rebuilds dist/ under a running bench. */
export function newestMtime(dir) {
  let newest = 0;
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = `${d}/${e.name}`;
      // The CLI's code cache (bin/code-cache.js) writes its entries there as commands run: not a rebuild.
      if (e.isDirectory()) {
        if (e.name !== '.code-cache') walk(p);
      }
      else newest = Math.max(newest, fs.statSync(p).mtimeMs);
    }
  };
  try {
    walk(dir);
  } catch {
    // missing dist/ is reported elsewhere
  }
  return newest;
}

export function clockTicks() {
  const n = Number(cmdOut('getconf', ['CLK_TCK']));
  return Number.isFinite(n) && n > 0 ? n : 100;
}

export function loadAvg() {
  return os.loadavg().map((x) => x.toFixed(2)).join(' ');
}
