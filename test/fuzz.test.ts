// Fuzzing every network parser of a live `blockmirror up` (test/fuzz/harness.ts): NBD handshake and
// transmission, the peer channel, the CFS protocol, the admin API's HTTP and JSON, and iSCSI PDUs.
// The suite runs a short pass; `npm run fuzz` runs BLOCKMIRROR_FUZZ_INPUTS per target (200000 each,
// 10^6 in all). Each target must end with no hang, no 5xx, the process alive with bounded memory,
// and a client on another volume reading back every write; then both pairs are in sync and every
// copy equals its master byte for byte.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connect, type NbdClient } from '../src/nbd/client.js';
import { Cmd, ClientFlag, Info, Opt } from '../src/protocol/constants.js';
import { encodeBhs } from '../src/protocol/iscsi/bhs.js';
import { Op } from '../src/protocol/iscsi/constants.js';
import { framePdu } from '../src/protocol/iscsi/framer.js';
import { encodeText } from '../src/protocol/iscsi/text.js';
import { encodeFrame } from '../src/controller/peer/framing.js';
import { fuzz, sendInput, type Report, type Target } from './fuzz/harness.js';
import { adminFetch } from './helpers/admin.js';
import { encodeOption, encodeRequest, goData, metaContextData } from './helpers/raw.js';
import { freePort, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';

const INPUTS = Number(process.env.BLOCKMIRROR_FUZZ_INPUTS ?? 1500);
const SEED = Number(process.env.BLOCKMIRROR_FUZZ_SEED ?? 20261204);
const RSS_LIMIT = 1536 * 1024 * 1024;
const p = { nbd1: 0, admin1: 0, peer1: 0, iscsi: 0, nbd2: 0, admin2: 0, peer2: 0, cfs: 0 };
let up: RunningCluster;
let health: NbdClient;
let dir: string;
const reports: Report[] = [];

beforeAll(async () => {
  for (const k of Object.keys(p) as (keyof typeof p)[]) p[k] = await freePort();
  dir = tmpDir('bm-fuzz-');
  fs.writeFileSync(
    path.join(dir, 'cluster.yaml'),
    `peerTimeout: 2s
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${p.nbd1}
    admin: 127.0.0.1:${p.admin1}
    peer: 127.0.0.1:${p.peer1}
    iscsi: 127.0.0.1:${p.iscsi}
    volumes: [ { id: 1, size: 64MiB }, { id: 2, size: 16MiB }, { id: 3, size: 16MiB }, { id: 4, size: 32MiB }, { id: 5, size: 32MiB } ]
  - id: 2
    nbd: 127.0.0.1:${p.nbd2}
    admin: 127.0.0.1:${p.admin2}
    peer: 127.0.0.1:${p.peer2}
    volumes: [ { id: 3, size: 16MiB } ]
pairs:
  - { name: rp, mode: sync, master: { ss: 1, vol: 3 }, mirrors: [ { ss: 2, vol: 3 } ] }
  - { name: lp, mode: async, master: { ss: 1, vol: 4 }, mirrors: [ { ss: 1, vol: 5 } ] }
cfs:
  listen: 127.0.0.1:${p.cfs}
  pairs: [ lp ]
`,
  );
  up = await startUp(path.join(dir, 'cluster.yaml'), [p.nbd1, p.admin1, p.iscsi, p.nbd2, p.admin2, p.cfs, p.peer2]);
  health = await connect(`nbd://127.0.0.1:${p.nbd1}/vol2`);
});

afterAll(async () => {
  await health?.close();
  await up?.stop();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
  if (reports.length) console.log(reports.map((r) => `${r.target}: ${r.inputs} inputs in ${r.ms} ms, ${r.hangs} hangs, ${r.serverErrors} 5xx, max RSS ${r.maxRssMiB} MiB`).join('\n'));
});

let healthRound = 0;
/** The oracles between batches: the process is alive, its memory bounded, and vol2 reads back what was written. */
async function check(): Promise<number> {
  expect(up.proc.exitCode, up.stderr().slice(-2000)).toBeNull();
  const data = Buffer.alloc(65536, ++healthRound & 0xff);
  const at = (healthRound % 200) * 65536;
  await health.pwrite(data, at);
  const back = Buffer.alloc(data.length);
  await health.pread(back, at);
  expect(back.equals(data)).toBe(true);
  const status = fs.readFileSync(`/proc/${up.proc.pid}/status`, 'utf8');
  const rss = Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024;
  expect(rss).toBeLessThan(RSS_LIMIT);
  return rss;
}

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};
const FLAGS = u32(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES);
const req = (type: number, offset: number, length: number, payload?: Buffer) => encodeRequest({ type, cookie: 7n, offset: BigInt(offset), length, ...(payload ? { payload } : {}) });

const nbd: Target = {
  name: 'NBD handshake and transmission',
  seeds: [
    Buffer.concat([FLAGS, encodeOption(Opt.GO, goData('vol1', [Info.BLOCK_SIZE])), req(Cmd.WRITE, 4096, 4096, Buffer.alloc(4096, 7)), req(Cmd.READ, 0, 8192), req(Cmd.FLUSH, 0, 0), req(Cmd.DISC, 0, 0)]),
    Buffer.concat([FLAGS, encodeOption(Opt.LIST), encodeOption(Opt.INFO, goData('vol1', [Info.NAME, Info.DESCRIPTION])), encodeOption(Opt.ABORT)]),
    Buffer.concat([FLAGS, encodeOption(Opt.STRUCTURED_REPLY), encodeOption(Opt.SET_META_CONTEXT, metaContextData('vol1', ['base:allocation'])), encodeOption(Opt.GO, goData('vol1')), req(Cmd.BLOCK_STATUS, 0, 1 << 20), req(Cmd.CACHE, 0, 65536), req(Cmd.DISC, 0, 0)]),
    Buffer.concat([FLAGS, encodeOption(Opt.EXPORT_NAME, Buffer.from('vol1')), req(Cmd.TRIM, 0, 65536), req(Cmd.WRITE_ZEROES, 65536, 65536), req(Cmd.DISC, 0, 0)]),
    Buffer.concat([FLAGS, encodeOption(Opt.STARTTLS), encodeOption(Opt.LIST_META_CONTEXT, metaContextData('vol1', [])), encodeOption(Opt.GO, goData(''))]),
  ],
  send: (b) => sendInput(p.nbd1, b),
};

const peer: Target = {
  name: 'peer channel',
  seeds: [
    Buffer.concat([encodeFrame({ t: 'hello', v: 2, from: 1, to: 2 }), encodeFrame({ t: 'req', id: 1, op: 'bits', pair: 'rp', ops: [['i', 0, 3], ['v', 1]] }), encodeFrame({ t: 'ping' })]),
    Buffer.concat([encodeFrame({ t: 'hello', v: 2, from: 1, to: 2 }), encodeFrame({ t: 'req', id: 2, op: 'attach', pair: 'rp', epoch: 1, master: 1, vol: 3 }), encodeFrame({ t: 'req', id: 3, op: 'hashes', pair: 'rp', first: 0, count: 4 })]),
    Buffer.concat([encodeFrame({ t: 'data', v: 2, from: 1, to: 2, export: 'vol3' }), FLAGS, encodeOption(Opt.GO, goData('vol3')), req(Cmd.READ, 0, 4096)]),
    encodeFrame({ t: 'req', id: 1, op: 'swap', pair: 'rp', epoch: 2 }),
  ],
  send: (b) => sendInput(p.peer2, b),
};

const line = (o: object) => Buffer.from(`${JSON.stringify(o)}\n`);
const cfs: Target = {
  name: 'CFS protocol',
  seeds: [
    Buffer.concat([line({ id: 1, op: 'hello', version: 1, client: 'fuzz' }), line({ id: 2, op: 'readdir', path: '/' }), line({ id: 3, op: 'stat', path: '/a' })]),
    Buffer.concat([line({ id: 1, op: 'hello', version: 1, client: 'fuzz' }), line({ id: 2, op: 'open', path: '/f', mode: 'w', create: true }), line({ id: 3, op: 'alloc', handle: 1, blocks: 4 }), line({ id: 4, op: 'close', handle: 1 })]),
    Buffer.concat([line({ id: 1, op: 'mkdir', path: '/d' }), line({ id: 2, op: 'rename', from: '/d', to: '/e' }), line({ id: 3, op: 'unlink', path: '/e' })]),
  ],
  send: (b) => sendInput(p.cfs, b),
};

const token = () => process.env.BLOCKMIRROR_ADMIN_TOKEN!;
const http = (method: string, url: string, body: string) =>
  Buffer.from(`${method} ${url} HTTP/1.1\r\nHost: 127.0.0.1:${p.admin1}\r\nAuthorization: Bearer ${token()}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
const admin: Target = {
  name: 'admin API (HTTP and JSON bodies)',
  get seeds() {
    return [
      http('PUT', '/api/faults/9:99/error', '{"op":["write"],"range":{"start":0,"length":4096},"probability":0.5}'),
      http('PUT', '/api/faults/link:1-9/delay', '{"ms":10,"jitter":5}'),
      http('POST', '/api/pairs/nope/split', '{}'),
      http('DELETE', '/api/faults/9:99?kind=error', ''),
      http('GET', '/api/pairs/nope/bitmap?buckets=64', ''),
    ];
  },
  async send(b) {
    // Raw bytes through the HTTP parser and the JSON body parser; a 5xx status line is a finding.
    let head = '';
    const outcome = await sendInput(p.admin1, b, 5000, (c) => {
      if (head.length < 16) head += c.toString('latin1');
    });
    return /^HTTP\/1\.1 5\d\d/.test(head) ? 'server-error' : outcome;
  },
};

const login = (keys: Array<[string, string]>, csg = 0, nsg = 3) =>
  Buffer.concat(framePdu(encodeBhs({ opcode: Op.LOGIN_REQ, immediate: true, transit: true, csg, nsg, isid: 0x800000000001, itt: 1, cmdSN: 1 }), encodeText(keys), { headerDigest: false, dataDigest: false }));
const iscsi: Target = {
  name: 'iSCSI PDUs',
  seeds: [
    login([['InitiatorName', 'iqn.2026-12.test:fuzz'], ['TargetName', 'iqn.2026-12.org.blockmirror:ss1'], ['SessionType', 'Normal'], ['AuthMethod', 'None'], ['MaxRecvDataSegmentLength', '65536']]),
    Buffer.concat([
      login([['InitiatorName', 'iqn.2026-12.test:fuzz'], ['SessionType', 'Discovery'], ['AuthMethod', 'None']]),
      ...framePdu(encodeBhs({ opcode: Op.TEXT_REQ, immediate: true, final: true, itt: 2, ttt: 0xffffffff, cmdSN: 1 }), encodeText([['SendTargets', 'All']]), { headerDigest: false, dataDigest: false }),
    ]),
    Buffer.concat([
      login([['InitiatorName', 'iqn.2026-12.test:fuzz'], ['TargetName', 'iqn.2026-12.org.blockmirror:ss1'], ['SessionType', 'Normal'], ['AuthMethod', 'None']]),
      ...framePdu(encodeBhs({ opcode: Op.NOP_OUT, immediate: true, final: true, itt: 3, ttt: 0xffffffff, cmdSN: 1 }), undefined, { headerDigest: false, dataDigest: false }),
      ...framePdu(encodeBhs({ opcode: Op.SCSI_CMD, final: true, read: true, attr: 1, itt: 4, expectedDataTransferLength: 512, cmdSN: 1, cdb: Buffer.from([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]) } as never), undefined, { headerDigest: false, dataDigest: false }),
    ]),
  ],
  send: (b) => sendInput(p.iscsi, b),
};

describe(`fuzzing the network parsers (${INPUTS} inputs per target, seed ${SEED})`, () => {
  for (const [i, target] of [nbd, peer, cfs, admin, iscsi].entries()) {
    it(`${target.name}: no crash, no hang, no 5xx, bounded memory, other clients unaffected`, { timeout: Math.max(60_000, INPUTS * 20) }, async () => {
      const r = await fuzz(target, INPUTS, SEED + i, { parallel: 16, every: Math.min(1000, INPUTS), check });
      reports.push(r);
      expect({ hangs: r.hangs, serverErrors: r.serverErrors }).toEqual({ hangs: 0, serverErrors: 0 });
    });
  }

  it('leaves both pairs in sync, with every copy equal to its master byte for byte', async () => {
    // The peer fuzzing may have knocked the link down: the pairs resync by themselves.
    const deadline = Date.now() + 30_000;
    let pairs: { name: string; state: string; mirrors: { invalidClusters: number }[] }[] = [];
    while (Date.now() < deadline) {
      pairs = ((await (await adminFetch(`http://127.0.0.1:${p.admin1}/api/status`)).json()) as { pairs: typeof pairs }).pairs;
      if (pairs.every((x) => x.state === 'PAIR' && x.mirrors.every((m) => m.invalidClusters === 0))) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(pairs.map((x) => [x.name, x.state, x.mirrors.map((m) => m.invalidClusters)]).sort()).toEqual([['lp', 'PAIR', [0]], ['rp', 'PAIR', [0]]]);
    const copies = [[`nbd://127.0.0.1:${p.nbd1}/vol3`, `nbd://127.0.0.1:${p.nbd2}/vol3`], [`nbd://127.0.0.1:${p.nbd1}/vol4`, `nbd://127.0.0.1:${p.nbd1}/vol5`]];
    for (const [a, b] of copies) {
      const [ca, cb] = await Promise.all([connect(a!), connect(b!)]);
      const [x, y] = [Buffer.alloc(ca.size), Buffer.alloc(cb.size)];
      await Promise.all([ca.pread(x, 0), cb.pread(y, 0)]);
      await Promise.all([ca.close(), cb.close()]);
      expect(x.equals(y), `${a} vs ${b}`).toBe(true);
    }
  });
});
