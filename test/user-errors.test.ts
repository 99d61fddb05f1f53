// The errors a user can cause, word for word, each naming what to do next: a bad YAML, a port in
// use, a peer storage system that is not running, an export name that does not exist. Shown by
// the real CLI and, for the export, by real NBD clients (qemu-img; nbdinfo's libnbd debug log).
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { ExportTable } from '../src/nbd/exports.js';
import { CLI, PYTHON, ROOT, freePort, run, startServe, startUp, tmpDir } from './helpers/servers.js';

// The README's troubleshooting section quotes these messages with its own file names and ports;
// each test checks that the message it got, with those substituted, is the one quoted.
const README = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
const quotedInReadme = (message: string, from: (string | number)[], to: (string | number)[]) => {
  let m = message;
  from.forEach((f, i) => (m = m.split(String(f)).join(String(to[i]))));
  expect(README).toContain(`\n  ${m}\n`);
};

const top = tmpDir('bm-user-errors-');
afterAll(() => fs.rmSync(top, { recursive: true, force: true }));

function yamlFile(name: string, text: string): string {
  const f = path.join(top, name);
  fs.writeFileSync(f, text);
  return f;
}

/** A port held by a listener of this test until `close`. */
async function holdPort(): Promise<{ port: number; close(): Promise<void> }> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return { port, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

const cli = (args: string[]) => run(process.execPath, [CLI, '--log-level', 'silent', ...args]);

describe('a bad YAML', () => {
  it('is refused with file:line:column, the problem and what to do', async () => {
    const file = yamlFile('bad.yaml', 'storageSystems:\n  - id: 1\n    nbd: 127.0.0.1:0\n    admin: 127.0.0.1:0\n    volumes:\n     - id: 1\n      size: 1MiB\n');
    const r = await cli(['up', '-c', file]);
    expect(r.stderr).toBe(
      `blockmirror: ${file}:7:1: YAML syntax error: Sequence item without - indicator; correct the YAML at that line and column (config/demo.yaml is a commented example)\n`,
    );
    expect(r.code).toBe(2);
    quotedInReadme(r.stderr.trimEnd(), [file], ['config.yaml']);
  });
});

describe('a port in use', () => {
  it('names the YAML key of an NBD address another process holds, and how to find that process', async () => {
    const held = await holdPort();
    try {
      const file = yamlFile('nbd-in-use.yaml', `storageSystems:\n  - id: 1\n    nbd: 127.0.0.1:${held.port}\n    admin: 127.0.0.1:0\n    volumes: [ { id: 1, size: 1MiB } ]\n`);
      const r = await cli(['up', '-c', file]);
      expect(r.stderr).toBe(
        `blockmirror: ${file}: storageSystems[0].nbd: 127.0.0.1:${held.port} is already in use by another process; ` +
          `stop that process (ss -ltnp 'sport = :${held.port}' shows it) or change the port of storageSystems[0].nbd\n`,
      );
      expect(r.code).toBe(1);
      quotedInReadme(r.stderr.trimEnd(), [file, held.port], ['config/demo.yaml', 10809]);
    } finally {
      await held.close();
    }
  });

  it('names the admin key of the second storage system when its admin port is held', async () => {
    const held = await holdPort();
    try {
      const file = yamlFile(
        'admin-in-use.yaml',
        'storageSystems:\n' +
          '  - { id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", volumes: [ { id: 1, size: 1MiB } ] }\n' +
          `  - { id: 2, nbd: "127.0.0.1:0", admin: "127.0.0.1:${held.port}", volumes: [ { id: 1, size: 1MiB } ] }\n`,
      );
      const r = await cli(['up', '-c', file]);
      expect(r.stderr).toBe(
        `blockmirror: ${file}: storageSystems[1].admin: 127.0.0.1:${held.port} is already in use by another process; ` +
          `stop that process (ss -ltnp 'sport = :${held.port}' shows it) or change the port of storageSystems[1].admin\n`,
      );
      expect(r.code).toBe(1);
    } finally {
      await held.close();
    }
  });

  it('names --listen for serve', async () => {
    const held = await holdPort();
    try {
      const r = await cli(['serve', '--size', '1MiB', '--listen', `127.0.0.1:${held.port}`]);
      expect(r.stderr).toBe(
        `blockmirror: --listen: 127.0.0.1:${held.port} is already in use by another process; stop that process (ss -ltnp 'sport = :${held.port}' shows it) or choose another --listen\n`,
      );
      expect(r.code).toBe(1);
    } finally {
      await held.close();
    }
  });
});

describe('a missing peer', () => {
  it('shows in status and the log which storage system is not running and how to start it', async () => {
    const [nbd1, admin1, peer1, nbd2, admin2, peer2] = await Promise.all([freePort(), freePort(), freePort(), freePort(), freePort(), freePort()]);
    const file = yamlFile(
      'two.yaml',
      `storageSystems:
  - { id: 1, nbd: "127.0.0.1:${nbd1}", admin: "127.0.0.1:${admin1}", peer: "127.0.0.1:${peer1}", volumes: [ { id: 8, size: 1MiB } ] }
  - { id: 2, nbd: "127.0.0.1:${nbd2}", admin: "127.0.0.1:${admin2}", peer: "127.0.0.1:${peer2}", volumes: [ { id: 8, size: 1MiB } ] }
pairs:
  - { name: pair1, mode: sync, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 2, vol: 8 } ] }
`,
    );
    const up = await startUp(file, [nbd1, admin1], ['--only', '1']);
    try {
      const waiting =
        `waiting for storage system 2 (peer 127.0.0.1:${peer2}): start it on its host (blockmirror up --only 2); ` +
        'writes are tracked and copied once it connects';
      const r = await run(process.execPath, [CLI, 'status', '-c', file]);
      expect(r.stdout).toContain(
        `\n  storage system 2 (127.0.0.1:${admin2}) is not reachable: connect ECONNREFUSED; start it on its host (blockmirror up -c ${file} --only 2) or check its admin address\n`,
      );
      expect(r.stdout).toContain(`\n  pair1: PSUE: ${waiting}\n`);
      expect(r.code).toBe(1);
      const suspended = up
        .stderr()
        .split('\n')
        .filter((l) => l.includes('"pair suspended (PSUE)"'))
        .map((l) => (JSON.parse(l) as { reason: string }).reason);
      expect(suspended).toEqual([waiting]);
      const lines = r.stdout.split('\n').filter((l) => l.includes('is not reachable') || l.includes('PSUE: waiting')).map((l) => l.trim());
      expect(lines).toHaveLength(2);
      for (const l of lines) quotedInReadme(l, [file, `127.0.0.1:${admin2}`, `127.0.0.1:${peer2}`], ['config/two-sites.yaml', '127.0.0.1:9002', '10.0.0.2:7001']);
    } finally {
      await up.stop();
    }
  });
});

describe('an export name that does not exist', () => {
  it('is answered with the exports that do exist, as qemu-img and nbdinfo show it', async () => {
    const s = await startServe(['--size', '1MiB', '--name', 'data']);
    try {
      const uri = `nbd://127.0.0.1:${s.port}/nope`;
      const message = 'no export named "nope"; the exports are: data (nbdinfo --list shows them all)';
      const q = await run('qemu-img', ['info', uri]);
      expect(q.stderr).toBe(`qemu-img: Could not open '${uri}': Requested export not available\nserver reported: ${message}\n`);
      expect(q.code).toBe(1);
      // nbdinfo 1.14 prints the server's message in libnbd's debug output.
      const n = await run('nbdinfo', [uri], { env: { LIBNBD_DEBUG: '1' } });
      expect(n.stderr).toContain(`nbd_opt_go: handshake: server error message: ${message}\n`);
      expect(n.stderr).toContain('nbdinfo: nbd_opt_go: server replied with error to opt_go request: No such file or directory');
      expect(n.code).toBe(1);
    } finally {
      await s.stop();
    }
  });

  it('is logged by the server with the exports that exist when an old client asks with EXPORT_NAME, which has no error reply', async () => {
    const s = await startServe(['--size', '1MiB', '--name', 'data']);
    try {
      // Handshake flags 0: no fixed newstyle, so libnbd can only send EXPORT_NAME; the server closes.
      const py = `import nbd\nh = nbd.NBD()\nh.set_handshake_flags(0)\nh.set_export_name('nope')\ntry:\n  h.connect_tcp('127.0.0.1', '${s.port}')\nexcept nbd.Error as e:\n  print(e)\n`;
      const r = await run(PYTHON, ['-c', py]);
      expect(r.stdout).toBe('nbd_connect_tcp: recv: server disconnected unexpectedly\n');
      const reason = 'EXPORT_NAME: no export named "nope"; the exports are: data (nbdinfo --list shows them all)';
      await expect
        .poll(() => s.stderr().split('\n').filter((l) => l.includes('"handshake refused"')).map((l) => (JSON.parse(l) as { reason: string }).reason))
        .toEqual([reason]);
    } finally {
      await s.stop();
    }
  });

  it('lists ten exports then says how many more, leaves hidden ones out and clips long names', () => {
    const t = new ExportTable();
    const device = new MemoryDevice(4096, false);
    for (let i = 1; i <= 12; i++) t.add({ name: `vol${i}`, description: '', device, readOnly: false });
    t.add({ name: 'replica', description: '', device, readOnly: false, hidden: true });
    expect(t.unknownExportMessage('x'.repeat(100))).toBe(
      `no export named "${'x'.repeat(63)}…"; the exports are: vol1, vol2, vol3, vol4, vol5, vol6, vol7, vol8, vol9, vol10 and 2 more (nbdinfo --list shows them all)`,
    );
    expect(new ExportTable().unknownExportMessage('a')).toBe('no export named "a"; this server lists no exports');
    // The demo's volumes, in config order, as the README quotes them.
    const demo = new ExportTable();
    for (const id of [8, 7, 5, 6, 9]) demo.add({ name: `vol${id}`, description: '', device, readOnly: false });
    quotedInReadme(`server reported: ${demo.unknownExportMessage('vol3')}`, [], []);
  });
});

describe('a storage system or CFS server that is not running, asked by a command', () => {
  it('names the storage system a pair command could not reach and how to start it', async () => {
    const [nbd, admin] = await Promise.all([freePort(), freePort()]);
    const file = yamlFile(
      'down.yaml',
      `storageSystems:\n  - { id: 3, nbd: "127.0.0.1:${nbd}", admin: "127.0.0.1:${admin}", volumes: [ { id: 1, size: 1MiB }, { id: 2, size: 1MiB } ] }\npairs:\n  - { name: p, mode: async, master: { ss: 3, vol: 1 }, mirrors: [ { ss: 3, vol: 2 } ] }\n`,
    );
    const r = await cli(['pair', 'split', 'p', '-c', file]);
    expect(r.stderr).toBe(
      `blockmirror: split p: storage system 3 (127.0.0.1:${admin}) is not reachable: connect ECONNREFUSED; start it on its host (blockmirror up -c ${file} --only 3) or check its admin address\n`,
    );
    expect(r.code).toBe(1);
    const f = await cli(['fault', 'list', '--config', file]);
    expect(f.stderr).toBe(
      `blockmirror: fault list: storage system 3 (127.0.0.1:${admin}) is not reachable: connect ECONNREFUSED; start it on its host (blockmirror up -c ${file} --only 3) or check its admin address\n`,
    );
    quotedInReadme(r.stderr.trimEnd(), [file, `127.0.0.1:${admin}`], ['config.yaml', '127.0.0.1:9003']);
  });

  it('says how to start the CFS server, or to check --server', async () => {
    const [nbd, admin, cfs] = await Promise.all([freePort(), freePort(), freePort()]);
    const file = yamlFile('cfs-down.yaml', `storageSystems:\n  - { id: 1, nbd: "127.0.0.1:${nbd}", admin: "127.0.0.1:${admin}", volumes: [ { id: 1, size: 1MiB }, { id: 2, size: 1MiB } ] }\npairs:\n  - { name: p, mode: async, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }\ncfs:\n  listen: 127.0.0.1:${cfs}\n`);
    const r = await cli(['cfs', 'ls', '-c', file]);
    expect(r.stderr).toBe(
      `blockmirror: cannot reach the CFS server at 127.0.0.1:${cfs}: ECONNREFUSED; start it: blockmirror up -c ${file} runs it with the storage systems, blockmirror cfs serve -c ${file} alone (or give its address with --server)\n`,
    );
    expect(r.code).toBe(1);
    const s = await cli(['cfs', 'ls', '-c', file, '--server', `127.0.0.1:${cfs}`]);
    expect(s.stderr).toBe(`blockmirror: cannot reach the CFS server at 127.0.0.1:${cfs}: ECONNREFUSED; start the CFS server there, or check --server\n`);
    quotedInReadme(r.stderr.trimEnd(), [file, `127.0.0.1:${cfs}`], ['cfs.yaml', '127.0.0.1:7070']);
  });

  it('refuses a gateway on a YAML without etcd, with an example to follow', async () => {
    const file = yamlFile('no-etcd.yaml', 'storageSystems:\n  - { id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", volumes: [ { id: 1, size: 1MiB } ] }\n');
    const r = await cli(['gateway', '-c', file, '--listen', '127.0.0.1:0']);
    expect(r.stderr).toBe(`blockmirror: ${file} has no etcd: section; a gateway finds each volume's master in etcd (config/etcd.yaml is an example)\n`);
    expect(r.code).toBe(2);
  });
});
