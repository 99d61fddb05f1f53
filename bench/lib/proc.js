// Child processes of the benchmark: every server and fio run is tracked so
// that an error, a signal or a normal exit leaves nothing running behind us.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The node flags on a checkout's bin/blockmirror.js shebang (`#!/usr/bin/env node`, or
 * `#!/usr/bin/env -S node FLAGS` before the server commands set their own flag, bin/server-flags.js),
 * for spawning it with `process.execPath` as users' `blockmirror` command runs it. A baseline
 * checkout (--baseline DIR) runs with its own.
 */
export function nodeFlagsOf(root) {
  const file = path.join(root, 'bin', 'blockmirror.js');
  const first = fs.readFileSync(file, 'utf8').split('\n', 1)[0];
  const m = /^#!\/usr\/bin\/env (?:-S )?node(.*)$/.exec(first);
  if (!m) throw new Error(`${file}: unexpected first line ${first}`);
  return m[1].trim().split(/\s+/).filter(Boolean);
}

/** This checkout's (none now: a server command restarts itself with its flags). */
export const NODE_FLAGS = nodeFlagsOf(fileURLToPath(new URL('../..', import.meta.url)));

const live = new Set();
const exitHooks = [];

function track(child) {
  live.add(child);
  child.once('exit', () => live.delete(child));
  return child;
}

/**
 * Kill whatever is still running when this process exits, however it exits.
 * Only 'exit' is guaranteed to run on every path (throw, process.exit,
 * signal turned into exit), and it must be synchronous: hence SIGKILL, and
 * hooks that use sync fs calls only.
 */
export function installCleanup() {
  process.on('exit', () => {
    for (const c of live) {
      try {
        c.kill('SIGKILL');
      } catch {
        // already gone
      }
    }
    for (const hook of exitHooks) {
      try {
        hook();
      } catch {
        // best effort: never mask the original exit status
      }
    }
  });
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.on(sig, () => {
      process.stderr.write(`\nbench: ${sig}, stopping everything\n`);
      process.exit(130);
    });
  }
}

export function onExit(hook) {
  exitHooks.push(hook);
}

/** Run a command to completion; resolve { code, signal, stdout, stderr }. Kills it after timeoutMs. */
export function run(cmd, args, { timeoutMs = 0 } = {}) {
  return new Promise((resolve, reject) => {
    const child = track(spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }));
    const out = [];
    const err = [];
    child.stdout.on('data', (d) => out.push(d));
    child.stderr.on('data', (d) => err.push(d));
    let timedOut = false;
    const timer =
      timeoutMs > 0
        ? setTimeout(() => {
            timedOut = true;
            child.kill('SIGKILL');
          }, timeoutMs)
        : null;
    child.once('error', (e) => {
      if (timer) clearTimeout(timer);
      reject(new Error(`${cmd}: ${e.message}`));
    });
    child.once('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      const res = { code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() };
      if (timedOut) reject(Object.assign(new Error(`${cmd} timed out after ${timeoutMs} ms`), res));
      else resolve(res);
    });
  });
}

/** A free TCP port on 127.0.0.1 (closed again at once; the small race is acceptable here). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Does the endpoint answer with the NBD greeting? A listening socket alone is not enough: the export may not be set up yet. */
function probe(endpoint) {
  return new Promise((resolve) => {
    const sock = endpoint.kind === 'tcp' ? net.connect(endpoint.port, endpoint.host) : net.connect(endpoint.path);
    let got = Buffer.alloc(0);
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(2000, () => done(false));
    sock.on('error', () => done(false));
    sock.on('data', (d) => {
      got = Buffer.concat([got, d]);
      if (got.length >= 8) done(got.subarray(0, 8).toString('latin1') === 'NBDMAGIC');
    });
    sock.on('end', () => done(false));
  });
}

/**
 * Start a long-running server and wait until it speaks NBD on `endpoint`.
 * Returns a handle with pid, stop(), alive() and the tail of its output.
 */
export async function startServer(label, cmd, args, endpoint, { readyTimeoutMs = 20000 } = {}) {
  const child = track(spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  let tail = '';
  const keep = (d) => {
    tail = (tail + d.toString()).slice(-8192);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  let exited = null;
  const exitP = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      exited = { code, signal };
      resolve(exited);
    });
    child.once('error', (e) => {
      keep(`spawn error: ${e.message}\n`);
      exited = { code: -1, signal: null };
      resolve(exited);
    });
  });

  const server = {
    label,
    pid: child.pid,
    endpoint,
    output: () => tail,
    alive: () => exited === null,
    describeExit: () => (exited ? `exited with ${exited.signal ?? `code ${exited.code}`}` : 'running'),
    /** SIGTERM (lets `node --cpu-prof` write its profile), SIGKILL if it lingers. */
    async stop(graceMs = 15000) {
      if (exited) return exited;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), graceMs);
      const res = await exitP;
      clearTimeout(t);
      return res;
    },
  };

  const deadline = Date.now() + readyTimeoutMs;
  for (;;) {
    if (exited) throw new Error(`${label} ${server.describeExit()} before it was ready:\n${tail}`);
    if (endpoint.kind === 'tcp' || fs.existsSync(endpoint.path)) {
      if (await probe(endpoint)) return server;
    }
    if (Date.now() > deadline) {
      await server.stop();
      throw new Error(`${label} not ready after ${readyTimeoutMs} ms:\n${tail}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** VmRSS and VmHWM of a process, in bytes. */
export function readMemory(pid) {
  const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (key) => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text);
    return m ? Number(m[1]) * 1024 : NaN;
  };
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

/** Minor page faults of a process so far (a fresh page the kernel had to zero and map costs one). */
export function readMinorFaults(pid) {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return Number(text.slice(text.lastIndexOf(')') + 2).split(' ')[7]);
  } catch {
    return NaN;
  }
}

/** user+system CPU seconds used so far by a whole process (all threads). */
export function readCpuSeconds(pid, clkTck) {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm may contain spaces and parentheses: fields start after the last ')'.
    const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / clkTck;
  } catch {
    return NaN;
  }
}
