// The V8 flags of the server commands (up, serve, gateway, cfs serve, cfs mount), which the client
// commands must not pay for.
//
// `--max-semi-space-size=4` keeps V8's young generation at 4 MiB per semi-space instead of 16, and
// a server's RSS with it (a 10-minute soak peaked at 149 MiB without it and 128 MiB with it; the
// issue's limit is 150). But any non-default V8 flag makes V8 reject the code cache of Node's own
// modules, which Node then compiles from source at every start: 15 ms of `status` or `cfs ls`
// (163 -> 148 ms) and 7 ms of `--version`. V8 reads the flag only as the process starts
// (v8.setFlagsFromString later changes nothing), so blockmirror.js's first line carries no flag,
// and a server command started without it restarts itself with it, in place, before it loads
// anything: execv keeps the pid (a `kill` of the pid that was started still reaches the server),
// the environment, stdio and socket activation's fds 3 and up (the addon clears the close-on-exec
// mark Node puts on fds 0-2). That costs a server start one more bare Node start-up. The systemd
// units and `npm start` pass the flag themselves and start once.
'use strict';
const fs = require('node:fs');
const path = require('node:path');

const SERVER_NODE_FLAGS = ['--max-semi-space-size=4'];
/** Set across the execv, so that the restarted process never restarts again, whatever it finds. */
const RESTARTED = 'BLOCKMIRROR_SERVER_RESTARTED';
const BIN = path.join(__dirname, 'blockmirror.js');
const ADDON = path.join(__dirname, '../native/build/Release/sparse.node');
/** Options that take a value, globally (main.ts VALUE_OPTIONS) and before a cfs subcommand. */
const VALUE_OPTIONS = new Set(['--log-level', '-c', '--config', '--server']);

/** `--max_semi_space_size=8` and `--max-semi-space-size 8` name the flag of `--max-semi-space-size=4`. */
const flagName = (arg) => arg.split('=')[0].replace(/_/g, '-');

/** The flags of SERVER_NODE_FLAGS that neither the command line nor NODE_OPTIONS sets, with any value. */
function missingServerFlags(execArgv, nodeOptions) {
  const given = new Set([...execArgv, ...(nodeOptions ?? '').split(/\s+/)].filter((a) => a.startsWith('--')).map(flagName));
  return SERVER_NODE_FLAGS.filter((f) => !given.has(flagName(f)));
}

/** The words of a command line (after `node script`) that name its command: ['up'], ['cfs', 'mount'], ... */
function commandWords(args, count) {
  const words = [];
  for (let i = 0; i < args.length && words.length < count; i++) {
    const a = args[i];
    if (a === '--') break;
    if (a.startsWith('-')) {
      if (VALUE_OPTIONS.has(a)) i++;
      continue;
    }
    words.push(a);
  }
  return words;
}

/** Whether a command line starts a server (its help does not). */
function isServerCommand(args) {
  if (args.some((a) => a === '-h' || a === '--help')) return false;
  const [first, second] = commandWords(args, 2);
  if (first === 'up' || first === 'serve' || first === 'gateway') return true;
  return first === 'cfs' && (second === 'serve' || second === 'mount');
}

/** Socket activation's fds, when they are this process's (src/cli/socket-activation.ts takes them). */
function activationFds(env) {
  const n = Number(env.LISTEN_FDS);
  if (Number(env.LISTEN_PID) !== process.pid || !Number.isInteger(n) || n < 1 || n > 1024) return [];
  return Array.from({ length: n }, (_, i) => 3 + i);
}

function isBin(script) {
  try {
    return script !== undefined && fs.realpathSync(script) === fs.realpathSync(BIN);
  } catch {
    return false;
  }
}

/**
 * Called by blockmirror.js before it loads anything. Returns at once unless this is a server
 * command without its flags; otherwise replaces the process and does not return, except when that
 * cannot be done (no native addon, execv failed, or this process is not blockmirror.js: a test
 * runner that loaded this file is never replaced). The server then runs without the flags.
 */
function restartWithServerFlags() {
  const env = process.env;
  if (env[RESTARTED] !== undefined) {
    delete env[RESTARTED]; // not for our children
    return;
  }
  if (process.platform !== 'linux' || !isServerCommand(process.argv.slice(2))) return;
  const missing = missingServerFlags(process.execArgv, env.NODE_OPTIONS);
  if (missing.length === 0 || !isBin(process.argv[1])) return;
  let addon;
  try {
    addon = require(ADDON);
  } catch {
    return; // not built: the server runs without the flags
  }
  if (typeof addon.execSelf !== 'function') return; // built from an older native/sparse.c
  env[RESTARTED] = '1';
  addon.execSelf(process.execPath, [process.argv0, ...process.execArgv, ...missing, ...process.argv.slice(1)], activationFds(env));
  delete env[RESTARTED];
}

module.exports = { SERVER_NODE_FLAGS, missingServerFlags, isServerCommand, restartWithServerFlags };
