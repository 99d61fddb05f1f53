// targets/attach: the operator's script that attaches a cluster's exports with nbd-client.
// No kernel here: BM_SYSFS_BLOCK points it at a fake /sys/block, and BM_NBD_CLIENT / BM_MODPROBE
// at scripts that log their arguments and "attach" by writing the size and pid files a real
// connection makes the kernel show. So these check the exact nbd-client commands, the device
// choice, the state file and --detach; the kernel side is test/kernel-client.test.ts.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT, run, tmpDir, type CmdResult } from './helpers/servers.js';

const ATTACH = path.join(ROOT, 'targets/attach');
const DEMO = path.join(ROOT, 'config/demo.yaml');
const TWO = path.join(ROOT, 'config/two-pairs.yaml');

const top = tmpDir('bm-attach-test-');
afterAll(() => fs.rmSync(top, { recursive: true, force: true }));

const FAKE_NBD_CLIENT = `#!/bin/bash
# Logs its arguments; attaches by giving the device a size and a pid, as the kernel does.
echo "$*" >> "$FAKE_LOG"
case "$1" in
  -V) echo "This is nbd-client, from nbd \${FAKE_VERSION:-3.24}"; exit 0 ;;
  -d) d=\${2#/dev/}; echo 0 > "$BM_SYSFS_BLOCK/$d/size"; rm -f "$BM_SYSFS_BLOCK/$d/pid"; exit 0 ;;
esac
for a in "$@"; do
  if [ "$a" = "\${FAKE_FAIL:-}" ]; then echo "Negotiation: ..Error: Server error: unknown export" >&2; exit 1; fi
done
dev=\${3#/dev/}
[ -d "$BM_SYSFS_BLOCK/$dev" ] || { echo "Error: Cannot open NBD: No such file or directory" >&2; exit 1; }
echo 2097152 > "$BM_SYSFS_BLOCK/$dev/size"
echo $$ > "$BM_SYSFS_BLOCK/$dev/pid"
echo "Negotiation: ..size = 1024MB" >&2
`;

const FAKE_MODPROBE = `#!/bin/bash
echo "modprobe $*" >> "$FAKE_LOG"
for i in 0 1 2 3; do mkdir -p "$BM_SYSFS_BLOCK/nbd$i"; echo 0 > "$BM_SYSFS_BLOCK/nbd$i/size"; done
`;

interface Host {
  dir: string;
  sysfs: string;
  state: string;
  log: string;
  env: NodeJS.ProcessEnv;
}

let count = 0;

/** A fresh fake host: /sys/block with loop devices and nbdN devices, busy ones with a pid. */
function fakeHost(devices: { free?: number[]; busy?: number[] } = { free: [0, 1, 2, 3, 4, 5, 6, 7] }): Host {
  const dir = path.join(top, `host${count++}`);
  const sysfs = path.join(dir, 'sys/block');
  fs.mkdirSync(path.join(sysfs, 'loop0'), { recursive: true });
  for (const i of devices.free ?? []) {
    fs.mkdirSync(path.join(sysfs, `nbd${i}`));
    fs.writeFileSync(path.join(sysfs, `nbd${i}/size`), '0\n');
  }
  for (const i of devices.busy ?? []) {
    fs.mkdirSync(path.join(sysfs, `nbd${i}`));
    fs.writeFileSync(path.join(sysfs, `nbd${i}/size`), '524288\n');
    fs.writeFileSync(path.join(sysfs, `nbd${i}/pid`), '4242\n');
  }
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin);
  fs.writeFileSync(path.join(bin, 'nbd-client'), FAKE_NBD_CLIENT, { mode: 0o755 });
  fs.writeFileSync(path.join(bin, 'modprobe'), FAKE_MODPROBE, { mode: 0o755 });
  const log = path.join(dir, 'calls.log');
  const state = path.join(dir, 'run/attached.json');
  return {
    dir,
    sysfs,
    state,
    log,
    env: {
      BM_SYSFS_BLOCK: sysfs,
      BM_NBD_CLIENT: path.join(bin, 'nbd-client'),
      BM_MODPROBE: path.join(bin, 'modprobe'),
      BM_STATE_FILE: state,
      FAKE_LOG: log,
    },
  };
}

function attach(host: Host, args: string[], env: NodeJS.ProcessEnv = {}): Promise<CmdResult> {
  return run(ATTACH, args, { env: { ...host.env, ...env }, cwd: ROOT });
}

const lines = (s: string) => s.split('\n').filter((l) => l !== '');
const calls = (host: Host) => (fs.existsSync(host.log) ? lines(fs.readFileSync(host.log, 'utf8')) : []);
const connected = (host: Host, i: number) => fs.existsSync(path.join(host.sysfs, `nbd${i}/pid`));

interface StateEntry { config: string; ss: number; export: string; device: string; host: string; port: number; readOnly: boolean; pid: string | null }
const state = (host: Host): StateEntry[] => (JSON.parse(fs.readFileSync(host.state, 'utf8')) as { attached: StateEntry[] }).attached;

/** One line on stderr, nothing on stdout, the exit status given. */
function expectError(r: CmdResult, code: number, pattern: RegExp): void {
  expect(r.stdout).toBe('');
  expect(lines(r.stderr), r.stderr).toHaveLength(1);
  expect(r.stderr).toMatch(/^attach: /);
  expect(r.stderr).toMatch(pattern);
  expect(r.code).toBe(code);
}

function writeConfig(host: Host, name: string, text: string): string {
  const file = path.join(host.dir, name);
  fs.writeFileSync(file, text);
  return file;
}

describe.concurrent('targets/attach --dry-run', () => {
  it('prints one nbd-client per host-facing export of demo.yaml, on free devices in order', async () => {
    const host = fakeHost({ free: [1, 3, 4, 5, 10], busy: [0, 2] });
    const r = await attach(host, ['-c', 'config/demo.yaml', '--dry-run']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    // Masters vol8 and vol5 and the simplex vol9; the mirrors vol7 and vol6 are left out.
    expect(lines(r.stdout)).toEqual([
      'nbd-client 127.0.0.1 10809 /dev/nbd1 -N vol8 -b 4096',
      'nbd-client 127.0.0.1 10809 /dev/nbd3 -N vol5 -b 4096',
      'nbd-client 127.0.0.1 10809 /dev/nbd4 -N vol9 -b 4096',
    ]);
    expect(calls(host)).toEqual([]);
    expect(fs.existsSync(host.state)).toBe(false);
  });

  it('with --mirrors adds the mirrors read-only (-R); -C and -b go on every line', async () => {
    const host = fakeHost();
    const r = await attach(host, ['-c', DEMO, '--dry-run', '--mirrors', '--connections', '2', '--block-size', '512']);
    expect(r.code).toBe(0);
    expect(lines(r.stdout)).toEqual([
      'nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol8 -b 512 -C 2',
      'nbd-client 127.0.0.1 10809 /dev/nbd1 -N vol7 -b 512 -C 2 -R',
      'nbd-client 127.0.0.1 10809 /dev/nbd2 -N vol5 -b 512 -C 2',
      'nbd-client 127.0.0.1 10809 /dev/nbd3 -N vol6 -b 512 -C 2 -R',
      'nbd-client 127.0.0.1 10809 /dev/nbd4 -N vol9 -b 512 -C 2',
    ]);
  });

  it('two-pairs.yaml: each storage system at its own port; -C and -b short forms', async () => {
    const host = fakeHost();
    const r = await attach(host, ['-c', TWO, '--dry-run', '-C', '4', '-b', '1024', '--mirrors']);
    expect(r.code).toBe(0);
    expect(lines(r.stdout)).toEqual([
      'nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol1 -b 1024 -C 4',
      'nbd-client 127.0.0.1 10809 /dev/nbd1 -N vol2 -b 1024 -C 4 -R',
      'nbd-client 127.0.0.1 10809 /dev/nbd2 -N vol3 -b 1024 -C 4 -R',
      'nbd-client 127.0.0.1 10810 /dev/nbd3 -N vol1 -b 1024 -C 4',
      'nbd-client 127.0.0.1 10810 /dev/nbd4 -N vol2 -b 1024 -C 4 -R',
    ]);
  });

  it('--ss keeps one storage system', async () => {
    const host = fakeHost();
    const r = await attach(host, ['-c', TWO, '--dry-run', '--ss', '2']);
    expect(r.code).toBe(0);
    expect(lines(r.stdout)).toEqual(['nbd-client 127.0.0.1 10810 /dev/nbd0 -N vol1 -b 4096']);
  });

  it('says modprobe nbd first when the module is not loaded, then numbers from nbd0', async () => {
    const host = fakeHost({});
    const r = await attach(host, ['-c', DEMO, '--dry-run', '--ss', '1']);
    expect(r.code).toBe(0);
    expect(lines(r.stdout)).toEqual([
      'modprobe nbd',
      'nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol8 -b 4096',
      'nbd-client 127.0.0.1 10809 /dev/nbd1 -N vol5 -b 4096',
      'nbd-client 127.0.0.1 10809 /dev/nbd2 -N vol9 -b 4096',
    ]);
    expect(calls(host)).toEqual([]);
  });

  it('IPv6 addresses go to nbd-client bare; --host replaces the address in the YAML', async () => {
    const host = fakeHost();
    const file = writeConfig(
      host,
      'v6.yaml',
      'storageSystems:\n  - { id: 3, nbd: "[::1]:10811", admin: "127.0.0.1:9003", volumes: [ { id: 1, size: 1MiB } ] }\n',
    );
    const r = await attach(host, ['-c', file, '--dry-run']);
    expect(lines(r.stdout)).toEqual(['nbd-client ::1 10811 /dev/nbd0 -N vol1 -b 4096']);
    const other = await attach(host, ['-c', file, '--dry-run', '--host', 'storage.example']);
    expect(lines(other.stdout)).toEqual(['nbd-client storage.example 10811 /dev/nbd0 -N vol1 -b 4096']);
  });
});

describe.concurrent('targets/attach, attaching (fake nbd-client)', () => {
  it('attaches, records, skips what is attached, and --detach undoes exactly that', async () => {
    const host = fakeHost({ free: [0, 2, 3, 4, 5], busy: [1] });
    const r = await attach(host, ['-c', TWO, '-C', '2']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(lines(r.stdout)).toEqual(['vol1 ss1 127.0.0.1:10809 -> /dev/nbd0', 'vol1 ss2 127.0.0.1:10810 -> /dev/nbd2']);
    expect(calls(host)).toEqual([
      '127.0.0.1 10809 /dev/nbd0 -N vol1 -b 4096 -C 2',
      '127.0.0.1 10810 /dev/nbd2 -N vol1 -b 4096 -C 2',
    ]);
    expect(state(host).map((e) => [e.ss, e.export, e.device, e.port, e.readOnly, e.config])).toEqual([
      [1, 'vol1', '/dev/nbd0', 10809, false, TWO],
      [2, 'vol1', '/dev/nbd2', 10810, false, TWO],
    ]);
    expect(state(host).every((e) => /^\d+$/.test(e.pid ?? ''))).toBe(true);

    // Again, now with the mirrors: what is attached stays, only the mirrors are new.
    fs.rmSync(host.log);
    const again = await attach(host, ['-c', TWO, '--mirrors']);
    expect(again.code).toBe(0);
    expect(lines(again.stdout)).toEqual([
      'vol1 ss1 127.0.0.1:10809 -> /dev/nbd0 (already attached)',
      'vol2 ss1 127.0.0.1:10809 -> /dev/nbd3 (read-only)',
      'vol3 ss1 127.0.0.1:10809 -> /dev/nbd4 (read-only)',
      'vol1 ss2 127.0.0.1:10810 -> /dev/nbd2 (already attached)',
      'vol2 ss2 127.0.0.1:10810 -> /dev/nbd5 (read-only)',
    ]);
    expect(calls(host)).toEqual([
      '127.0.0.1 10809 /dev/nbd3 -N vol2 -b 4096 -R',
      '127.0.0.1 10809 /dev/nbd4 -N vol3 -b 4096 -R',
      '127.0.0.1 10810 /dev/nbd5 -N vol2 -b 4096 -R',
    ]);
    expect(state(host)).toHaveLength(5);

    // --detach --dry-run prints, changes nothing.
    fs.rmSync(host.log);
    const dry = await attach(host, ['-c', TWO, '--detach', '--dry-run', '--ss', '2']);
    expect(lines(dry.stdout)).toEqual(['nbd-client -d /dev/nbd2', 'nbd-client -d /dev/nbd5']);
    expect(calls(host)).toEqual([]);

    // --detach --ss 2 takes down ss2's devices only.
    const ss2 = await attach(host, ['-c', TWO, '--detach', '--ss', '2']);
    expect(ss2.code).toBe(0);
    expect(lines(ss2.stdout)).toEqual(['vol1 ss2 /dev/nbd2 detached', 'vol2 ss2 /dev/nbd5 detached']);
    expect(calls(host)).toEqual(['-d /dev/nbd2', '-d /dev/nbd5']);
    expect(state(host).map((e) => e.device)).toEqual(['/dev/nbd0', '/dev/nbd3', '/dev/nbd4']);

    // A device someone else re-attached since is left alone; one that dropped is just forgotten.
    fs.writeFileSync(path.join(host.sysfs, 'nbd3/pid'), '999999\n');
    fs.rmSync(path.join(host.sysfs, 'nbd4/pid'));
    fs.writeFileSync(path.join(host.sysfs, 'nbd4/size'), '0\n');
    fs.rmSync(host.log);
    const rest = await attach(host, ['-c', TWO, '--detach']);
    expect(rest.code).toBe(0);
    expect(lines(rest.stdout)).toEqual([
      'vol1 ss1 /dev/nbd0 detached',
      expect.stringMatching(/^vol2 ss1 \/dev\/nbd3 now belongs to another connection \(pid 999999, not \d+\); left alone$/),
      'vol3 ss1 /dev/nbd4 was no longer connected',
    ]);
    expect(calls(host)).toEqual(['-d /dev/nbd0']);
    expect(connected(host, 0)).toBe(false);
    expect(connected(host, 1)).toBe(true); // busy before we came: never touched
    expect(connected(host, 3)).toBe(true);
    expect(state(host)).toEqual([]);

    const none = await attach(host, ['-c', TWO, '--detach']);
    expect(none.code).toBe(0);
    expect(none.stdout).toBe('');
    expect(none.stderr).toMatch(/^attach: nothing recorded as attached for .*two-pairs\.yaml in /);
  });

  it('loads the nbd module when there is no nbd device', async () => {
    const host = fakeHost({});
    const r = await attach(host, ['-c', DEMO, '--ss', '1']);
    expect(r.code).toBe(0);
    expect(calls(host)[0]).toBe('modprobe nbd');
    expect(lines(r.stdout)).toEqual([
      'vol8 ss1 127.0.0.1:10809 -> /dev/nbd0',
      'vol5 ss1 127.0.0.1:10809 -> /dev/nbd1',
      'vol9 ss1 127.0.0.1:10809 -> /dev/nbd2',
    ]);
  });

  it('refuses before attaching anything when there are too few free devices', async () => {
    const host = fakeHost({ free: [2], busy: [0, 1] });
    const r = await attach(host, ['-c', DEMO]);
    expectError(r, 1, /no free \/dev\/nbd device for ss1 vol5, ss1 vol9: 1 of 3 free/);
    expect(calls(host)).toEqual([]);
  });

  it('stops at a failing nbd-client, says why, and keeps what it attached for --detach', async () => {
    const host = fakeHost();
    const r = await attach(host, ['-c', DEMO], { FAKE_FAIL: 'vol5' });
    expect(r.code).toBe(1);
    expect(lines(r.stdout)).toEqual(['vol8 ss1 127.0.0.1:10809 -> /dev/nbd0']);
    expect(lines(r.stderr)).toEqual([
      'attach: nbd-client failed for vol5 of ss1 at 127.0.0.1:10809 on /dev/nbd1: Negotiation: ..Error: Server error: unknown export (exit 1)',
      `attach: stopped; what was attached is recorded in ${host.state} (detach it with --detach)`,
    ]);
    expect(calls(host)).toHaveLength(2); // vol9 not tried
    expect(state(host).map((e) => e.export)).toEqual(['vol8']);
  });

  it('fails in one line when nbd-client is missing', async () => {
    const host = fakeHost();
    const r = await attach(host, ['-c', DEMO], { BM_NBD_CLIENT: path.join(host.dir, 'no-such-nbd-client') });
    expectError(r, 1, /BM_NBD_CLIENT=.*no-such-nbd-client is not an executable file/);
  });
});

describe.concurrent('targets/attach --nbdtab', () => {
  /**
   * nbdtab as nbd-client 3.24 reads it (nbdtab(5), nbdtab_lexer.l/nbdtab_parser.y): "#" lines are
   * comments; otherwise device, host, export and an optional comma list of flags and key=value.
   */
  const PROPERTIES = new Set(['port', 'certfile', 'keyfile', 'cacertfile', 'tlshostname', 'bs', 'timeout', 'conns']);
  const FLAGS = new Set(['no_optgo', 'persist', 'swap', 'sdp', 'unix', 'preinit', 'tls']);
  function parseNbdtab(text: string): { device: string; host: string; name: string; options: Record<string, string | true> }[] {
    return lines(text)
      .filter((l) => !/^\s*#/.test(l))
      .map((l) => {
        const fields = l.trim().split(/[ \t]+/);
        expect(fields.length, l).toBeGreaterThanOrEqual(3);
        expect(fields.length, l).toBeLessThanOrEqual(4);
        const [device, host, name, opts] = fields as [string, string, string, string | undefined];
        const options: Record<string, string | true> = {};
        for (const o of opts ? opts.split(',') : []) {
          const m = /^([^=,\s]+)(?:=([^=,\s]+))?$/.exec(o);
          expect(m, `option ${o} in: ${l}`).not.toBeNull();
          const [, key, value] = m!;
          expect(value === undefined ? FLAGS.has(key!) : PROPERTIES.has(key!), `option ${o} unknown to nbd-client`).toBe(true);
          options[key!] = value ?? true;
        }
        for (const f of [device, host, name]) expect(f).toMatch(/^[^\s,=#]+$/);
        return { device, host, name, options };
      });
  }

  it('prints lines nbd-client parses, one device per export', async () => {
    const host = fakeHost();
    const r = await attach(host, ['-c', DEMO, '--nbdtab', '--mirrors', '-C', '2']);
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    expect(parseNbdtab(r.stdout)).toEqual(
      ['vol8', 'vol7', 'vol5', 'vol6', 'vol9'].map((name, i) => ({
        device: `nbd${i}`,
        host: '127.0.0.1',
        name,
        options: { port: '10809', bs: '4096', conns: '2' },
      })),
    );
    expect(r.stdout).toContain('# ss1 vol7: mirror of pair1, read-only unless the pair is split\nnbd1 ');
    expect(r.stdout).not.toContain('port= needs');
    expect(calls(host)).toEqual(['-V']);
  });

  it('warns that nbd-client before 3.26 ignores port=, when a port is not 10809', async () => {
    const host = fakeHost();
    const r = await attach(host, ['-c', TWO, '--nbdtab']);
    expect(r.code).toBe(0);
    expect(parseNbdtab(r.stdout).map((e) => [e.device, e.name, e.options.port])).toEqual([
      ['nbd0', 'vol1', '10809'],
      ['nbd1', 'vol1', '10810'],
    ]);
    expect(r.stdout).toContain('# port= needs nbd-client 3.26 or later');
    expect(lines(r.stderr)).toEqual([
      expect.stringMatching(/^attach: warning: this host's nbd-client 3\.24 ignores port= in \/etc\/nbdtab .* vol1 of ss2 to port 10809, not 10810/),
    ]);
    const newer = await attach(host, ['-c', TWO, '--nbdtab'], { FAKE_VERSION: '3.27.1' });
    expect(newer.stderr).toBe('');
  });
});

describe.concurrent('targets/attach, bad input', () => {
  it('missing -c', async () => {
    const host = fakeHost();
    expectError(await attach(host, ['--dry-run']), 2, /-c FILE is required/);
  });

  it('a file that is not there', async () => {
    const host = fakeHost();
    expectError(await attach(host, ['-c', 'config/nope.yaml', '--dry-run']), 1, /^attach: config\/nope\.yaml: cannot read the file \(no such file: check the path; config\/ has examples/);
  });

  it('broken YAML, with the line and column', async () => {
    const host = fakeHost();
    const file = writeConfig(host, 'bad.yaml', 'storageSystems:\n  - id: 1\n    nbd: [unclosed\n');
    expectError(await attach(host, ['-c', file, '--dry-run']), 1, /bad\.yaml:\d+:\d+: YAML syntax error/);
  });

  it('YAML that up would refuse, refused the same way', async () => {
    const host = fakeHost();
    const file = writeConfig(host, 'wrong.yaml', 'storageSystems:\n  - { id: 1, nbd: "127.0.0.1:10809", admin: "127.0.0.1:9001", volumes: [] }\npairs:\n  - { name: p, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 1, vol: 7 } ] }\n');
    expectError(await attach(host, ['-c', file, '--dry-run']), 1, /wrong\.yaml: pairs\[0\]\.master: volume 8 does not exist in storage system 1/);
  });

  it('an unknown storage system', async () => {
    const host = fakeHost();
    expectError(await attach(host, ['-c', DEMO, '--ss', '3', '--dry-run']), 1, /demo\.yaml: there is no storage system 3 \(it has 1\)/);
  });

  it('a storage system on port 0', async () => {
    const host = fakeHost();
    const file = writeConfig(host, 'port0.yaml', 'storageSystems:\n  - { id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", volumes: [ { id: 1, size: 1MiB } ] }\n');
    expectError(await attach(host, ['-c', file, '--dry-run']), 1, /storage system 1 listens on port 0/);
  });

  it('bad option values and unknown options', async () => {
    const host = fakeHost();
    expectError(await attach(host, ['-c', DEMO, '-b', '3000', '--dry-run']), 2, /--block-size "3000": expected 512, 1024, 2048, 4096/);
    expectError(await attach(host, ['-c', DEMO, '-C', '0', '--dry-run']), 2, /--connections "0": expected 1 to 64/);
    expectError(await attach(host, ['-c', DEMO, '--ss', 'one', '--dry-run']), 2, /--ss "one": expected a storage system id/);
    expectError(await attach(host, ['-c', DEMO, '--frobnicate']), 2, /Unknown option '--frobnicate'/);
  });

  it('a damaged state file', async () => {
    const host = fakeHost();
    fs.mkdirSync(path.dirname(host.state), { recursive: true });
    fs.writeFileSync(host.state, '{ not json');
    expectError(await attach(host, ['-c', DEMO]), 1, /the state file .* is damaged/);
  });
});
