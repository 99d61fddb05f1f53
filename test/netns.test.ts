// Two storage systems on two "hosts": network namespaces joined by a veth
// pair, each storage system in its own namespace, clients running inside the
// namespaces. Faults are real: `ip link set ... down` cuts the wire without a
// RST (only the peer timeout can notice), and kill -9 takes a side away.
// Every scenario ends with a byte-for-byte comparison of both volumes, and on
// the surviving side of the sync pair no acknowledged write may be missing.
//
// Needs root (ip netns); CI runs as root. Not skipped otherwise: it fails.
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { PYTHON, run } from './helpers/servers.js';
import { makePki, type Pki } from './helpers/pki.js';
import { SSProcess, inSync, sameBytes, twoSSYaml, writeConfig, type PairView, type SSAddr } from './helpers/remote.js';

let seq = 0;
interface Net {
  ns1: string;
  ns2: string;
  dev1: string;
  dev2: string;
  a: SSAddr;
  b: SSAddr;
}
let net: Net;
const started: SSProcess[] = [];

async function sh(cmd: string, args: string[]) {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.code}: ${r.stderr.trim()}`);
  return r.stdout;
}

beforeEach(async () => {
  const tag = `bm${process.pid % 10000}x${seq++}`;
  const subnet = 10 + ((process.pid + seq) % 200);
  net = {
    ns1: `${tag}a`,
    ns2: `${tag}b`,
    dev1: `${tag}v1`,
    dev2: `${tag}v2`,
    a: { host: `10.${subnet}.0.1`, nbd: 10809, admin: 9001, peer: 7001 },
    b: { host: `10.${subnet}.0.2`, nbd: 10809, admin: 9001, peer: 7001 },
  };
  for (const ns of [net.ns1, net.ns2]) await sh('ip', ['netns', 'add', ns]);
  await sh('ip', ['link', 'add', net.dev1, 'netns', net.ns1, 'type', 'veth', 'peer', 'name', net.dev2, 'netns', net.ns2]);
  for (const [ns, dev, addr] of [[net.ns1, net.dev1, net.a.host], [net.ns2, net.dev2, net.b.host]] as const) {
    await sh('ip', ['-n', ns, 'addr', 'add', `${addr}/24`, 'dev', dev]);
    await sh('ip', ['-n', ns, 'link', 'set', dev, 'up']);
    await sh('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
  }
});

afterEach(async () => {
  await Promise.all(started.splice(0).map((s) => s.kill()));
  for (const ns of [net.ns1, net.ns2]) await run('ip', ['netns', 'del', ns]);
});

/** A command inside a namespace. */
const inNs = (ns: string, cmd: string, args: string[], timeoutMs?: number) => run('ip', ['netns', 'exec', ns, cmd, ...args], timeoutMs ? { timeoutMs } : {});

/** The storage systems' admin APIs are reachable only inside their namespaces: ask from there. */
class NsSS extends SSProcess {
  constructor(
    id: number,
    config: string,
    addr: SSAddr,
    readonly ns: string,
  ) {
    super(id, config, addr);
  }

  override async start(): Promise<void> {
    const args = [process.execPath, ...this.cliArgs()];
    this.spawnWith(['ip', 'netns', 'exec', this.ns, ...args]);
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      if (this.proc!.exitCode !== null) throw new Error(`ss${this.id} exited: ${this.stderr}`);
      if ((await this.status()) !== undefined) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`ss${this.id} did not start: ${this.stderr}`);
  }

  override async status() {
    const r = await inNs(this.ns, process.execPath, [
      '-e',
      `fetch(process.argv[1],{signal:AbortSignal.timeout(2000),headers:{authorization:'Bearer '+process.env.BLOCKMIRROR_ADMIN_TOKEN}}).then(r=>r.text()).then(t=>process.stdout.write(t),()=>process.exit(1))`,
      `http://${this.addr.host}:${this.addr.admin}/api/status`,
    ]);
    return r.code === 0 && r.stdout ? (JSON.parse(r.stdout) as Awaited<ReturnType<SSProcess['status']>>) : undefined;
  }

  cli(args: string[]) {
    return inNs(this.ns, process.execPath, [this.cliPath, ...args]);
  }

  qemuIo(vol: number, cmds: string[], readOnly = false) {
    return inNs(this.ns, 'qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...cmds.flatMap((c) => ['-c', c]), this.uri(vol)]);
  }
}

// The two hosts talk mutual TLS on the peer channel, as a real two-site setup should; the host-facing
// NBD and admin ports on the namespaces' addresses are accepted with security.insecure.
let pki: Pki;
beforeAll(() => {
  pki = makePki();
});
afterAll(() => pki.cleanup());

async function twoHosts(pairs: Parameters<typeof twoSSYaml>[2]) {
  const tls = { ca: pki.ca, certs: { 1: pki.cert('ss1'), 2: pki.cert('ss2') } };
  const { dir, file } = writeConfig(twoSSYaml(net.a, net.b, pairs, { peerTimeout: '1s', tls, insecure: true }));
  const ss1 = new NsSS(1, file, net.a, net.ns1);
  const ss2 = new NsSS(2, file, net.b, net.ns2);
  started.push(ss1, ss2);
  await Promise.all([ss1.start(), ss2.start()]);
  for (const p of pairs) await ss1.waitPair(p.name, inSync, 'in sync');
  return { dir, file, ss1, ss2 };
}

const link = (ns: string, dev: string, state: 'up' | 'down') => sh('ip', ['-n', ns, 'link', 'set', dev, state]);

/** fio in SS1's namespace: random writes with a verify pass at the end, so every acknowledged write is checked. */
function fioOn(ss: NsSS, vol: number, extra: string[] = []) {
  return inNs(ss.ns, 'fio', [
    '--name=w', '--ioengine=nbd', `--uri=${ss.uri(vol)}`, '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=4M',
    '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json', ...extra,
  ], 120_000);
}

describe('storage systems on two hosts (network namespaces)', () => {
  it('a link cut mid-writes (no RST): writes go on after the peer timeout, the mirror says stale, and a reconnect resyncs', async () => {
    const { dir, ss1, ss2 } = await twoHosts([
      { name: 'ps', mode: 'sync', vol: 2 },
      { name: 'pa', mode: 'async', vol: 1 },
    ]);
    const fio = fioOn(ss1, 2, ['--loops=6']);
    await new Promise((r) => setTimeout(r, 700));
    await link(net.ns2, net.dev2, 'down');
    const res = await fio;
    expect(res.code, res.stderr + res.stdout.slice(-2000)).toBe(0);
    // fio finished: no write waited for the silent mirror forever (how long is for bench/, not a test).
    const down = await ss1.waitPair('ps', (p) => p.state === 'PSUE', 'PSUE');
    expect(down.error).toMatch(/storage system 2/);
    expect((await ss1.qemuIo(1, ['write -P 0x66 1M 1M'])).code).toBe(0);
    // The mirror cannot hear its master: it serves its own data and says it may be stale.
    const view = await ss2.waitPair('pa', (p) => p.stale === true, 'stale');
    expect(view.role).toBe('mirror');
    expect((await ss2.qemuIo(1, ['read 0 64k'], true)).code).toBe(0);
    await link(net.ns2, net.dev2, 'up');
    await ss1.waitPair('ps', inSync, 'in sync again', 30_000);
    await ss1.waitPair('pa', inSync, 'in sync again', 30_000);
    await ss2.waitPair('pa', (p) => p.stale === false, 'fresh');
    expect(await sameBytes(ss1.volumeFile(dir, 2), ss2.volumeFile(dir, 2))).toBe(true);
    expect(await sameBytes(ss1.volumeFile(dir, 1), ss2.volumeFile(dir, 1))).toBe(true);
  });

  it('kill -9 of the mirror, then of the master, mid-writes: restarts reconnect and resync; every acknowledged sync write is on the mirror before any resync', async () => {
    const { dir, ss1, ss2 } = await twoHosts([{ name: 'ps', mode: 'sync', vol: 2 }]);
    const fio = fioOn(ss1, 2, ['--loops=4']);
    await new Promise((r) => setTimeout(r, 500));
    await ss2.kill();
    const res = await fio;
    expect(res.code, res.stderr).toBe(0);
    await ss2.start();
    await ss1.waitPair('ps', inSync, 'in sync', 30_000);
    expect(await sameBytes(ss1.volumeFile(dir, 2), ss2.volumeFile(dir, 2))).toBe(true);

    // The master dies mid-write. Every write the client saw acknowledged is recorded (block and
    // value); before SS1 comes back and before any resync, each one is read back from the mirror.
    const BLOCKS = 4096;
    const writer = inNs(net.ns1, PYTHON, ['-c', `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(${BLOCKS} * 8):
    h.pwrite(i.to_bytes(4, 'little') * 1024, (i % ${BLOCKS}) * 4096)
    print(i, flush=True)
`, ss1.uri(2)], 60_000);
    await new Promise((r) => setTimeout(r, 800));
    await ss1.kill();
    const acked = (await writer).stdout.trim().split('\n').filter((l) => l !== '').map(Number);
    expect(acked.length).toBeGreaterThan(10);
    expect(acked.length).toBeLessThan(BLOCKS * 8); // the kill came mid-way
    await ss2.waitPair('ps', (p) => p.stale === true, 'stale');
    // For each block: the value of its last acknowledged write; the one write in flight at the kill may also have landed.
    const last = acked[acked.length - 1]!;
    const check = await inNs(net.ns2, PYTHON, ['-c', `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
last = int(sys.argv[2]); n = ${BLOCKS}
bad = 0
for b in range(min(n, last + 1)):
    got = int.from_bytes(h.pread(4, b * 4096), 'little')
    ok = [b + ((last - b) // n) * n]
    if (last + 1) % n == b: ok.append(last + 1)
    if got not in ok:
        bad += 1
        if bad < 5: print('block', b, 'has', got, 'expected one of', ok)
print('bad', bad)
`, ss2.uri(2), String(last)], 60_000);
    expect(check.code, check.stderr).toBe(0);
    expect(check.stdout.trim().split('\n').pop()).toBe('bad 0');
    await ss1.start();
    await ss1.waitPair('ps', inSync, 'in sync after the master restart', 30_000);
    expect(await sameBytes(ss1.volumeFile(dir, 2), ss2.volumeFile(dir, 2))).toBe(true);
  });

  it('takeover while the link is cut: the old master keeps writing, and on reconnect it yields to the new master; then a swap back', async () => {
    const { dir, ss1, ss2 } = await twoHosts([{ name: 'ps', mode: 'sync', vol: 2 }]);
    expect((await ss1.qemuIo(2, ['write -P 0x11 0 1M'])).code).toBe(0);
    await link(net.ns1, net.dev1, 'down');
    await ss2.waitPair('ps', (p) => p.stale === true, 'stale');
    // SS2 does not hear SS1 any more: take over there.
    let t = await ss2.cli(['pair', 'takeover', 'ps', '-c', ss2.config]);
    for (let i = 0; t.code !== 0 && /reachable/.test(t.stderr) && i < 40; i++) {
      await new Promise((r) => setTimeout(r, 100));
      t = await ss2.cli(['pair', 'takeover', 'ps', '-c', ss2.config]);
    }
    expect(t.code, t.stderr).toBe(0);
    // Both sides now take writes: the old master (fence never, suspended) and the new one.
    expect((await ss1.qemuIo(2, ['write -P 0x22 2M 1M'])).code).toBe(0);
    expect((await ss2.qemuIo(2, ['write -P 0x33 4M 1M'])).code).toBe(0);
    await link(net.ns1, net.dev1, 'up');
    const demoted: PairView = await ss1.waitPair('ps', (p) => p.role === 'mirror', 'the mirror role', 30_000);
    expect(demoted).toMatchObject({ epoch: 2, master: { ss: 2, vol: 2 } });
    await ss2.waitPair('ps', inSync, 'in sync', 30_000);
    // The new master's data won everywhere: the old master's write during the cut is gone, and
    // the sync write acknowledged before the cut is on both.
    const clean = (r: { code: number | null; stdout: string }) => r.code === 0 && !/verification failed/.test(r.stdout);
    expect(clean(await ss1.qemuIo(2, ['read -P 0x33 4M 1M'], true))).toBe(true);
    expect(clean(await ss1.qemuIo(2, ['read -P 0 2M 1M'], true))).toBe(true);
    expect(clean(await ss2.qemuIo(2, ['read -P 0x11 0 1M'], true))).toBe(true);
    expect(await sameBytes(ss1.volumeFile(dir, 2), ss2.volumeFile(dir, 2))).toBe(true);

    const swap = await ss2.cli(['pair', 'swap', 'ps', '-c', ss2.config]);
    expect(swap.code, swap.stderr).toBe(0);
    const back = await ss1.waitPair('ps', (p) => p.role === 'master', 'the master role');
    expect(back.epoch).toBe(3);
    await ss1.waitPair('ps', inSync, 'in sync after the swap', 30_000);
    expect((await ss1.qemuIo(2, ['write -P 0x44 0 64k'])).code).toBe(0);
    expect((await ss2.qemuIo(2, ['read -P 0x44 0 64k'], true)).code).toBe(0);
    expect(await sameBytes(ss1.volumeFile(dir, 2), ss2.volumeFile(dir, 2))).toBe(true);
  });
});
