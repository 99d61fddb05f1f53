#!/usr/bin/env node
// targets/iscsi-login: discover and log in to every iSCSI target of a blockmirror cluster with
// open-iscsi (iscsiadm), on this Linux host; --logout undoes it.
//
// Reads the cluster YAML with the project's own loader (dist/cluster/config.js), so the targets
// are named exactly as `blockmirror up` names them: one per storage system with `iscsi:`
// (iqn.2026-12.org.blockmirror:ssN unless iscsiTarget says otherwise), plus one per volume that has
// its own iscsiTarget. CHAP: with iscsiChap or iscsiChapFile (or --chap-file on this host), the
// node records get the user and secret (and the mutual pair) before the login; a volume's target
// with CHAP of its own gets that. The secret goes to iscsiadm, never to the output.
// Plain JavaScript on purpose: it runs from a checkout after `npm install`, with no build of its own.
// Test seam (environment): BM_ISCSIADM (the iscsiadm binary).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { parseArgs } from 'node:util';
import { Failure, loadCluster, usageError } from './cluster.js';

const PROG = 'iscsi-login';
const USAGE = `usage: targets/iscsi-login -c FILE [options]
Discover (SendTargets) and log in to the iSCSI targets of a blockmirror cluster with iscsiadm.
Needs root and open-iscsi (iscsid running).

  -c, --config FILE   the cluster YAML (the file \`blockmirror up -c\` reads); required
      --ss ID         only the targets of storage system ID
      --host HOST     connect to HOST instead of the portal address in the YAML (say, 0.0.0.0)
      --chap-file F   CHAP secrets on this host (USER:SECRET, a second line for mutual CHAP)
                      for the storage systems' targets; default: iscsiChap or iscsiChapFile of
                      the YAML (a volume's target with CHAP of its own always uses that)
      --logout        log out of the targets instead
      --dry-run       print the iscsiadm commands (secrets masked), change nothing
  -h, --help

Example:
  targets/iscsi-login -c config/demo.yaml --dry-run
Exit status: 0 done, 1 failed, 2 usage error.`;


function options(argv) {
  let v;
  try {
    v = parseArgs({
      args: argv,
      strict: true,
      options: {
        config: { type: 'string', short: 'c' },
        ss: { type: 'string' },
        host: { type: 'string' },
        'chap-file': { type: 'string' },
        logout: { type: 'boolean' },
        'dry-run': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    }).values;
  } catch (e) {
    throw usageError(e.message.split('\n')[0].replace(/\.$/, ''));
  }
  if (v.help) return { help: true };
  if (!v.config) throw usageError('-c FILE is required: the cluster YAML');
  if (v.ss !== undefined && !/^[1-9]\d*$/.test(v.ss)) throw usageError(`--ss ${JSON.stringify(v.ss)}: expected a storage system id`);
  if (v.host !== undefined && !/^(?:[A-Za-z0-9.-]+|\[?[0-9A-Fa-f:.]+\]?)$/.test(v.host)) throw usageError(`--host ${JSON.stringify(v.host)}: expected a host name or address`);
  return { config: v.config, ss: v.ss === undefined ? undefined : Number(v.ss), host: v.host?.replace(/^\[(.*)\]$/, '$1'), chapFile: v['chap-file'], logout: v.logout ?? false, dryRun: v['dry-run'] ?? false };
}

/** CHAP of a target: a file to read, or the YAML's inline secrets. */
function chapOf(file, inline) {
  if (file !== undefined) return file;
  if (inline === undefined) return undefined;
  return { user: inline.user, secret: inline.secret, ...(inline.mutualUser !== undefined ? { mutual: [inline.mutualUser, inline.mutualSecret] } : {}) };
}

/** Every (portal, target, chap) the YAML defines, in file order. */
function targets(config, opts) {
  const out = [];
  for (const ss of config.storageSystems) {
    if (!ss.iscsi || (opts.ss !== undefined && ss.id !== opts.ss)) continue;
    const host = opts.host ?? (ss.iscsi.listen.host === '0.0.0.0' ? '127.0.0.1' : ss.iscsi.listen.host === '::' ? '::1' : ss.iscsi.listen.host);
    if (ss.iscsi.listen.port === 0) throw new Failure(`storage system ${ss.id}: its iscsi port is 0 in ${config.source} (any free port), so its portal is not known`);
    const portal = host.includes(':') ? `[${host}]:${ss.iscsi.listen.port}` : `${host}:${ss.iscsi.listen.port}`;
    const chap = chapOf(opts.chapFile ?? ss.iscsi.chapFile, ss.iscsi.chap);
    out.push({ ss: ss.id, portal, target: ss.iscsi.target, chap });
    const seen = new Set([ss.iscsi.target]);
    for (const v of ss.volumes) {
      if (!v.iscsiTarget || seen.has(v.iscsiTarget)) continue;
      seen.add(v.iscsiTarget);
      out.push({ ss: ss.id, portal, target: v.iscsiTarget, chap: chapOf(v.iscsiChapFile, v.iscsiChap) ?? chap });
    }
  }
  if (opts.ss !== undefined && !config.storageSystems.some((s) => s.id === opts.ss)) throw usageError(`--ss ${opts.ss}: ${config.source} has no storage system ${opts.ss}`);
  if (out.length === 0) throw new Failure(`${config.source} defines no iSCSI target${opts.ss !== undefined ? ` on storage system ${opts.ss}` : ''} (add iscsi: HOST:PORT to a storage system)`);
  return out;
}

function readChap(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new Failure(`cannot read the CHAP file ${file}: ${e.code ?? e.message}; give this host's copy with --chap-file`);
  }
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
  const pair = (l, n) => {
    const i = l.indexOf(':');
    if (i <= 0 || i === l.length - 1) throw new Failure(`${file}: line ${n} must be USER:SECRET`);
    return [l.slice(0, i), l.slice(i + 1)];
  };
  if (lines.length < 1 || lines.length > 2) throw new Failure(`${file}: expected one or two lines USER:SECRET`);
  const [user, secret] = pair(lines[0], 1);
  return lines[1] ? { user, secret, mutual: pair(lines[1], 2) } : { user, secret };
}

function commands(list, opts) {
  const cmds = [];
  const portals = [...new Set(list.map((t) => t.portal))];
  if (opts.logout) {
    for (const t of list) cmds.push({ args: ['-m', 'node', '-T', t.target, '-p', t.portal, '--logout'], show: null, okCodes: [0, 21] });
    return cmds;
  }
  for (const p of portals) cmds.push({ args: ['-m', 'discovery', '-t', 'sendtargets', '-p', p], okCodes: [0] });
  for (const t of list) {
    const node = ['-m', 'node', '-T', t.target, '-p', t.portal];
    if (t.chap) {
      const c = typeof t.chap === 'string' ? readChap(t.chap) : t.chap;
      const set = (name, value, secret) => cmds.push({ args: [...node, '-o', 'update', '-n', name, '-v', value], show: secret ? [...node, '-o', 'update', '-n', name, '-v', '********'] : null, okCodes: [0] });
      set('node.session.auth.authmethod', 'CHAP');
      set('node.session.auth.username', c.user);
      set('node.session.auth.password', c.secret, true);
      if (c.mutual) {
        set('node.session.auth.username_in', c.mutual[0]);
        set('node.session.auth.password_in', c.mutual[1], true);
      }
    }
    // 15: already logged in; that is what we want.
    cmds.push({ args: [...node, '--login'], okCodes: [0, 15] });
  }
  return cmds;
}

async function main(argv) {
  const opts = options(argv);
  if (opts.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const config = await loadCluster(opts.config);
  const list = targets(config, opts);
  const iscsiadm = process.env.BM_ISCSIADM || 'iscsiadm';
  for (const c of commands(list, opts)) {
    const shown = `iscsiadm ${(c.show ?? c.args).join(' ')}`;
    if (opts.dryRun) {
      process.stdout.write(`${shown}\n`);
      continue;
    }
    const r = spawnSync(iscsiadm, c.args, { encoding: 'utf8' });
    if (r.error) throw new Failure(r.error.code === 'ENOENT' ? `${iscsiadm} is missing: install open-iscsi (apt-get install open-iscsi)` : `${shown}: ${r.error.message}`);
    if (!c.okCodes.includes(r.status)) throw new Failure(`${shown} failed (exit ${r.status}): ${(r.stderr || r.stdout).trim().split('\n').pop()}`);
  }
  if (!opts.dryRun) for (const t of list) process.stdout.write(`${t.target} ${t.portal} ${opts.logout ? 'logged out' : 'logged in'}\n`);
}

main(process.argv.slice(2)).catch((e) => {
  process.stderr.write(`${PROG}: ${e instanceof Failure ? e.message : e.stack ?? e}\n`);
  process.exit(e instanceof Failure ? e.code : 1);
});
