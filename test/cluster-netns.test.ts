// The master cut from etcd but not from its hosts (docs/cluster.md, fencing), with network
// namespaces: three "hosts", the master's (ss1, and a client writing to it there), the mirror's
// (ss2) and etcd's. The wire between the master's host and etcd's goes down; the master and its
// client, and the master and its mirror, still talk.
//
//        ns "a": ss1 + client  ── 10.N.0.0/24 ──  ns "b": ss2
//               │ 10.N.1.0/24 (cut)                   │ 10.N.2.0/24
//               └──────────── ns "e": etcd at 10.N.9.1 ┘
//
// The client's operations carry CLOCK_MONOTONIC times, and the test notes when etcd deleted
// ss1's registration (its lease ended) on the same clock: a write invoked after that moment
// reached ss1 after its lease ended, so ss1 must not have acknowledged it. Every write it did
// acknowledge must be on the new master. Needs root (ip netns); CI runs as root.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { makePki } from './helpers/pki.js';
import { TORN, checkHistory, parseOps } from './helpers/history.js';
import { NsSS, inNs, sh } from './helpers/netns.js';
import { inSync, sameBytes, twoSSYaml, writeConfig } from './helpers/remote.js';
import { PYTHON, run, tmpDir } from './helpers/servers.js';

const CLIENT = fileURLToPath(new URL('./py/history_client.py', import.meta.url));
const BLOCKS = 256;
const ETCD_PORT = 2379;

let seq = 0;
let ns: { a: string; b: string; e: string; cut: string; etcdHost: string; subnet: number };
const started: (NsSS | ChildProcess)[] = [];

beforeEach(async () => {
  const tag = `bme${process.pid % 10000}x${seq++}`;
  const subnet = 10 + ((process.pid * 7 + seq) % 200);
  ns = { a: `${tag}a`, b: `${tag}b`, e: `${tag}e`, cut: `${tag}ea`, etcdHost: `10.${subnet}.9.1`, subnet };
  for (const n of [ns.a, ns.b, ns.e]) {
    await sh('ip', ['netns', 'add', n]);
    await sh('ip', ['-n', n, 'link', 'set', 'lo', 'up']);
  }
  /** A wire between two namespaces, with an address at each end in 10.N.net.0/24. */
  const wire = async (n1: string, d1: string, h1: number, n2: string, d2: string, h2: number, net: number) => {
    await sh('ip', ['link', 'add', d1, 'netns', n1, 'type', 'veth', 'peer', 'name', d2, 'netns', n2]);
    for (const [n, d, h] of [[n1, d1, h1], [n2, d2, h2]] as const) {
      await sh('ip', ['-n', n, 'addr', 'add', `10.${subnet}.${net}.${h}/24`, 'dev', d]);
      await sh('ip', ['-n', n, 'link', 'set', d, 'up']);
    }
  };
  await wire(ns.a, `${tag}ab`, 1, ns.b, `${tag}ba`, 2, 0);
  await wire(ns.a, `${tag}ae`, 1, ns.e, ns.cut, 254, 1);
  await wire(ns.b, `${tag}be`, 2, ns.e, `${tag}eb`, 254, 2);
  await sh('ip', ['-n', ns.e, 'addr', 'add', `${ns.etcdHost}/32`, 'dev', 'lo']);
  await sh('ip', ['-n', ns.a, 'route', 'add', `${ns.etcdHost}/32`, 'via', `10.${subnet}.1.254`]);
  await sh('ip', ['-n', ns.b, 'route', 'add', `${ns.etcdHost}/32`, 'via', `10.${subnet}.2.254`]);
});

afterEach(async () => {
  await Promise.all(
    started.splice(0).map(async (p) => {
      if (p instanceof NsSS) return p.kill();
      if (p.exitCode === null && p.signalCode === null) {
        const exited = new Promise((r) => p.once('exit', r));
        p.kill('SIGKILL');
        await exited;
      }
    }),
  );
  for (const n of [ns.a, ns.b, ns.e]) await run('ip', ['netns', 'del', n]);
});

/** One etcd member on etcd's host; resolves once it answers. */
async function startEtcd(): Promise<string> {
  const endpoint = `${ns.etcdHost}:${ETCD_PORT}`;
  const dir = tmpDir('bm-etcd-ns-');
  const proc = spawn('ip', ['netns', 'exec', ns.e, 'etcd', '--name', 'e', '--data-dir', path.join(dir, 'e'),
    '--listen-client-urls', `http://${endpoint}`, '--advertise-client-urls', `http://${endpoint}`,
    '--listen-peer-urls', `http://${ns.etcdHost}:2380`, '--initial-advertise-peer-urls', `http://${ns.etcdHost}:2380`,
    '--initial-cluster', `e=http://${ns.etcdHost}:2380`, '--heartbeat-interval', '50', '--election-timeout', '500'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (err = (err + d).slice(-4000)));
  started.push(proc);
  for (let i = 0; i < 200; i++) {
    if ((await inNs(ns.b, 'etcdctl', ['--endpoints', endpoint, 'endpoint', 'health'])).code === 0) return endpoint;
    if (proc.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`etcd did not start in ${ns.e}: ${err}`);
}

/** CLOCK_MONOTONIC in microseconds: the clock of the client's times (python's time.monotonic_ns). */
const now = () => Number(process.hrtime.bigint() / 1000n);

describe('a master cut from etcd but not from its hosts (network namespaces)', () => {
  it('fences itself: it acknowledges no write invoked after its lease ended, every write it acknowledged is on the new master, and it rejoins as a mirror', async () => {
    const endpoint = await startEtcd();
    const pki = makePki();
    try {
      const a = { host: `10.${ns.subnet}.0.1`, nbd: 10809, admin: 9001, peer: 7001 };
      const b = { host: `10.${ns.subnet}.0.2`, nbd: 10809, admin: 9001, peer: 7001 };
      const tls = { ca: pki.ca, certs: { 1: pki.cert('ss1'), 2: pki.cert('ss2') } };
      const prefix = '/bm-netns';
      const yaml = twoSSYaml(a, b, [{ name: 'ps', mode: 'sync', vol: 2 }], { peerTimeout: '1s', tls, insecure: true });
      const cfg = writeConfig(`${yaml}etcd:\n  endpoints: [ ${endpoint} ]\n  prefix: ${prefix}\n  leaseTtl: 2s\n`);
      const ss1 = new NsSS(1, cfg.file, a, ns.a);
      const ss2 = new NsSS(2, cfg.file, b, ns.b);
      started.push(ss1, ss2);
      await Promise.all([ss1.start(), ss2.start()]);
      await ss1.waitPair('ps', inSync, 'in sync', 30_000);
      // Only a mirror that etcd's volume mirrors table calls PAIR may be promoted; the master
      // publishes the row every TTL/2, so wait for it (a start may record PSUE until the link is up).
      for (let i = 0; ; i++) {
        const row = await inNs(ns.b, 'etcdctl', ['--endpoints', endpoint, 'get', `${prefix}/mirrors/ps`, '--print-value-only']);
        if (/"state":"PAIR"/.test(row.stdout)) break;
        if (i === 300) throw new Error(`the volume mirrors row of ps never said PAIR: ${row.stdout}${row.stderr}`);
        await new Promise((r) => setTimeout(r, 100));
      }

      // Watch ss1's registration from the mirror's host, which stays connected to etcd.
      let leaseEnded = Infinity;
      const watch = spawn('ip', ['netns', 'exec', ns.b, 'etcdctl', '--endpoints', endpoint, 'watch', `${prefix}/ss/1`], { stdio: ['ignore', 'pipe', 'ignore'] });
      started.push(watch);
      watch.stdout!.setEncoding('utf8').on('data', (d: string) => {
        if (d.includes('DELETE') && leaseEnded === Infinity) leaseEnded = now();
      });

      // A host on the master's side writes (and reads) without a pause in between, through it all.
      const stop = path.join(cfg.dir, 'stop');
      const client = spawn('ip', ['netns', 'exec', ns.a, PYTHON, CLIENT, ss1.uri(2), '1', '16', String(BLOCKS), stop], { stdio: ['ignore', 'pipe', 'pipe'] });
      started.push(client);
      let out = '';
      let clientErr = '';
      client.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
      client.stderr!.setEncoding('utf8').on('data', (d: string) => (clientErr += d));
      const clientDone = new Promise((r) => client.once('close', r));
      const acked = () => (out.match(/ ok\n/g) ?? []).length;
      const until = async (ok: () => boolean, what: string, tries = 600) => {
        for (let i = 0; i < tries && !ok(); i++) await new Promise((r) => setTimeout(r, 50));
        if (!ok()) throw new Error(`never: ${what}; client: ${clientErr.slice(-1000)}`);
      };
      await until(() => acked() > 200, 'the client made progress');

      const cutAt = now();
      await sh('ip', ['-n', ns.e, 'link', 'set', ns.cut, 'down']);
      await until(() => leaseEnded < Infinity, 'ss1\'s registration expired', 400);
      const promoted = await ss2.waitPair('ps', (p) => p.role === 'master' && p.epoch === 2, 'the master role', 30_000);
      expect(promoted.master).toEqual({ ss: 2, vol: 2 });
      // Writes go on arriving at ss1 well after its lease ended.
      const errorsAfter = () => parseOps(1, out).filter((o) => o.kind === 'write' && !o.ok && o.inv > leaseEnded).length;
      await until(() => errorsAfter() > 20, 'writes refused after the lease ended');

      // The wire comes back: ss1 learns the newer epoch and rejoins as a mirror; the client is still at it.
      await sh('ip', ['-n', ns.e, 'link', 'set', ns.cut, 'up']);
      await ss1.waitPair('ps', (p) => p.role === 'mirror' && p.epoch === 2, 'the mirror role', 30_000);
      await ss2.waitPair('ps', inSync, 'in sync with ss1 as its mirror', 30_000);
      fs.writeFileSync(stop, '');
      await clientDone;

      const ops = parseOps(1, out);
      const writes = ops.filter((o) => o.kind === 'write');
      const ackedAfterCut = writes.filter((o) => o.ok && o.inv > cutAt);
      const ackedAfterLease = writes.filter((o) => o.ok && o.inv > leaseEnded);
      const refused = writes.filter((o) => !o.ok && o.inv > leaseEnded);
      const fin = await inNs(ns.b, PYTHON, [CLIENT, ss2.uri(2), '0', '0', String(BLOCKS), '--final']);
      expect(fin.code, fin.stderr).toBe(0);
      const final = new Map(parseOps(0, fin.stdout).map((o) => [o.block, o.torn ? TORN : o.value]));
      const anomalies = checkHistory(ops, final);
      console.log(
        `cut from etcd: ${writes.length} writes; acknowledged after the cut ${ackedAfterCut.length} (before the fence), ` +
          `after the lease ended ${ackedAfterLease.length}; refused after the lease ended ${refused.length}; anomalies ${anomalies.length}`,
      );
      expect(ackedAfterLease).toEqual([]);
      expect(refused.length).toBeGreaterThan(20);
      // Every write ss1 acknowledged, before or after the cut, is on ss2: none was lost.
      expect(anomalies).toEqual([]);
      expect(final.size).toBe(BLOCKS);

      await ss1.kill('SIGTERM');
      await ss2.kill('SIGTERM');
      expect(await sameBytes(ss1.volumeFile(cfg.dir, 2), ss2.volumeFile(cfg.dir, 2))).toBe(true);
    } finally {
      pki.cleanup();
    }
  }, 150_000);
});
