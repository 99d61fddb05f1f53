// The real Linux dm-multipath follows `blockmirror pair swap` across two storage systems' iSCSI
// targets, inside a small VM (test/vm/iscsi-multipath-vm, guest script test/vm/iscsi-multipath-swap.sh):
// the guest logs in to the pair's LUN on both targets, builds a multipath map with dmsetup (two
// priority groups, the master's path first, queue_if_no_path off) and writes through
// /dev/mapper/bm. When it says "VMTEST: writing" the host swaps the pair; the old master's path
// answers 02/04/0B, dm-multipath fails it and goes on through the new master's, no write fails,
// and what the guest reads back and both volume files hold the same bytes.
// Slow: the VM runs under software emulation.
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminFetch } from './helpers/admin.js';
import { requireTools } from './helpers/clients.js';
import { startIscsiPair, type IscsiPairCluster } from './helpers/iscsi.js';
import { CLI, ROOT, run, type CmdResult, type RunningCluster } from './helpers/servers.js';

const TOOL = path.join(ROOT, 'test/vm/iscsi-multipath-vm');
const GUEST = path.join(ROOT, 'test/vm/iscsi-multipath-swap.sh');
const VM_TIMEOUT_MS = 900_000;
const MiB = 1 << 20;
const target = (ss: number) => `iqn.2026-12.org.blockmirror:ss${ss}`;

/** The VM run under way: its process group, ended by afterAll if the test gave up on it. */
let vmGroup: number | undefined;

/** The VM tool, its VMTEST lines handed to `onLine` as they come (the run is its own process group). */
function runVm(args: string[], onLine: (line: string) => void): Promise<CmdResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(TOOL, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    vmGroup = p.pid;
    let stdout = '';
    let stderr = '';
    let partial = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
      const lines = (partial + d).split('\n');
      partial = lines.pop()!;
      for (const l of lines) onLine(l);
    });
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const t = setTimeout(() => process.kill(-p.pid!, 'SIGTERM'), VM_TIMEOUT_MS);
    p.once('error', (e) => { clearTimeout(t); reject(e); });
    p.once('close', (code) => { clearTimeout(t); vmGroup = undefined; resolve({ code, stdout, stderr }); });
  });
}

/**
 * `dmsetup status` of a multipath map: the group used next, and per priority group its state
 * (A active, E enabled) and its paths' states (A active, F failed).
 */
function multipathStatus(line: string): { nextGroup: number; groups: Array<{ state: string; paths: Array<{ dev: string; state: string }> }> } {
  const t = line.trim().split(/\s+/);
  let at = t.indexOf('multipath') + 1;
  at += 1 + Number(t[at]); // features
  at += 1 + Number(t[at]); // hardware handler
  const groups = Number(t[at]);
  const nextGroup = Number(t[at + 1]);
  at += 2;
  const out = [];
  for (let g = 0; g < groups; g++) {
    const state = t[at]!;
    at += 1 + 1 + Number(t[at + 1]); // state, selector status args
    const paths = Number(t[at]);
    const argsPerPath = Number(t[at + 1]);
    at += 2;
    const ps = [];
    for (let i = 0; i < paths; i++) {
      ps.push({ dev: t[at]!, state: t[at + 1]! });
      at += 3 + argsPerPath;
    }
    out.push({ state, paths: ps });
  }
  return { nextGroup, groups: out };
}

describe('the Linux kernel dm-multipath across a pair swap (a VM, two iSCSI paths)', () => {
  let dir: string;
  let c: RunningCluster | undefined;
  let p: IscsiPairCluster['p'];

  beforeAll(async () => {
    requireTools('qemu-system-x86_64', 'busybox', 'iscsid', 'iscsiadm', 'dmsetup');
    ({ dir, c, p } = await startIscsiPair('bm-iscsi-kmpath-', '32MiB'));
  }, 120_000);

  afterAll(async () => {
    if (vmGroup !== undefined) process.kill(-vmGroup, 'SIGTERM');
    await c?.stop();
  });

  it('keeps the guest\'s writes through /dev/mapper going while `pair swap` runs: dm-multipath fails the old master\'s path and moves to the new master\'s, no write fails, and the data reads back and is on both volume files', async () => {
    let swap: Promise<CmdResult> | undefined;
    const vm = await runVm(['--script', GUEST, String(p.iscsi[0]), target(1), String(p.iscsi[1]), target(2)], (line) => {
      if (line.startsWith('VMTEST: writing') && !swap) swap = run(process.execPath, [CLI, 'pair', 'swap', 'px', '-c', path.join(dir, 'cluster.yaml')], { timeoutMs: 300_000 });
    });
    const log = `${vm.stdout}\n${vm.stderr}\ncluster: ${c!.stderr().slice(-3000)}`;
    console.log(vm.stdout);
    expect(swap, log).toBeDefined();
    const s = await swap!;
    expect(s.code, `${s.stderr}\n${log}`).toBe(0);
    expect(vm.code, log).toBe(0);

    // Before: group 1 (path A, the master's) active, both paths up.
    const paths = /VMTEST: paths A \/dev\/\w+ \((\d+:\d+)\) B \/dev\/\w+ \((\d+:\d+)\)/.exec(vm.stdout);
    expect(paths, log).not.toBeNull();
    const [, devA, devB] = paths!;
    const before = multipathStatus(/VMTEST: status before: (.*)/.exec(vm.stdout)![1]!);
    expect(before.nextGroup, log).toBe(1);
    expect(before.groups.map((g) => g.paths.map((q) => `${q.dev} ${q.state}`)), log).toEqual([[`${devA} A`], [`${devB} A`]]);
    expect(vm.stdout).toMatch(/VMTEST: writing \(pass 0 done through A/);
    // After: path A failed (02/04/0B is a path error), group 2 (path B, the new master's) active.
    expect(vm.stdout).toMatch(/VMTEST: path A failed at pass \d+ chunk \d+/);
    expect(vm.stdout).toContain('no write failed');
    const after = multipathStatus(/VMTEST: status after: (.*)/.exec(vm.stdout)![1]!);
    expect(after.groups.map((g) => g.paths.map((q) => `${q.dev} ${q.state}`)), log).toEqual([[`${devA} F`], [`${devB} A`]]);
    expect([after.nextGroup, after.groups[1]!.state], log).toEqual([2, 'A']);
    // The kernel's view: sd logged the standby sense, dm-multipath failed the path, no error reached the map.
    expect(vm.stdout).toMatch(/VMTEST: dmesg: .*Add\. Sense: Logical unit not accessible, target port in standby state/);
    expect(vm.stdout).toMatch(new RegExp(`VMTEST: dmesg: .*multipath.*Failing path ${devA}`));
    expect(vm.stdout).not.toMatch(/I\/O error, dev dm-/);
    const sum = /VMTEST: read back sha256 ok ([0-9a-f]{64})/.exec(vm.stdout)?.[1];
    expect(sum, log).toBeDefined();

    const st = (await (await adminFetch(`http://127.0.0.1:${p.admin[1]}/api/pairs/px`)).json()) as { state: string; master: { ss: number } };
    expect(st.master.ss).toBe(2);
    await c!.stop();
    c = undefined;
    const one = fs.readFileSync(path.join(dir, 'ss1', 'vol1.img'));
    const two = fs.readFileSync(path.join(dir, 'ss2', 'vol1.img'));
    expect(one.length).toBe(32 * MiB);
    expect(one.equals(two)).toBe(true);
    expect(crypto.createHash('sha256').update(one.subarray(0, 16 * MiB)).digest('hex')).toBe(sum);
  }, VM_TIMEOUT_MS + 120_000);
});
