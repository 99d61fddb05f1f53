// scripts/setup and the README's two commands. On this machine everything is installed, so
// "something missing" is simulated: a directory of stubs (dpkg-query, id, apt-get) first on PATH,
// written with shell builtins only, so a PATH of nothing but the stubs still runs them.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT, run, tmpDir } from './helpers/servers.js';

const SETUP = path.join(ROOT, 'scripts/setup');
const CI_RUN = path.join(ROOT, '.ci/run');

const top = tmpDir('bm-setup-test-');
afterAll(() => fs.rmSync(top, { recursive: true, force: true }));

// dpkg-query reports every package installed except those of $STUB_MISSING, until apt-get has
// "installed" them; apt-get logs its arguments; id -u answers $STUB_UID.
const STUBS: Record<string, string> = {
  'dpkg-query': `#!/bin/bash
shift 2
for p in "$@"; do
  if [[ " $STUB_MISSING " == *" $p "* && ! -e "$STUB_DIR/installed" ]]; then echo "dpkg-query: no packages found matching $p" >&2; else echo "$p ii "; fi
done
`,
  id: `#!/bin/bash
echo "$STUB_UID"
`,
  'apt-get': `#!/bin/bash
echo "$*" >> "$STUB_DIR/apt.log"
[ "$1" = install ] && : > "$STUB_DIR/installed"
exit 0
`,
  // Never the real npm: an npm ci here would rewrite the node_modules the rest of the suite runs on.
  npm: `#!/bin/bash
echo "$*" >> "$STUB_DIR/npm.log"
exit 0
`,
};

function stubDir(): string {
  const dir = fs.mkdtempSync(path.join(top, 'stubs-'));
  for (const [name, text] of Object.entries(STUBS)) fs.writeFileSync(path.join(dir, name), text, { mode: 0o755 });
  return dir;
}

function aptLog(dir: string): string[] {
  const f = path.join(dir, 'apt.log');
  return fs.existsSync(f) ? fs.readFileSync(f, 'utf8').trim().split('\n') : [];
}

/** The fenced block under "## The two commands", one command per line, comments dropped. */
function readmeCommands(): string[] {
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const section = readme.split(/^## The two commands$/m)[1]!.split(/^## /m)[0]!;
  const block = /^```sh\n([\s\S]*?)^```$/m.exec(section)![1]!;
  return block
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => l.replace(/\s+#.*$/, ''));
}

describe('scripts/setup', () => {
  it('finds nothing missing on this machine for the test suite, and installs nothing to say so', async () => {
    const r = await run('bash', [SETUP, '--test', '--check']);
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/^scripts\/setup: nothing missing \(\d+ Debian packages, \d+ tools, npm dependencies up to date\)\n$/);
    expect(r.code).toBe(0);
  });

  it('needs no root when nothing is missing', async () => {
    const dir = stubDir();
    const r = await run('/bin/bash', [SETUP, '--test'], { env: { PATH: `${dir}:${process.env.PATH}`, STUB_DIR: dir, STUB_UID: '1000', STUB_MISSING: '' } });
    expect(r.stderr).toBe('');
    // The npm step depends on this work tree's state (a lock file newer than node_modules): the stub takes it.
    expect(r.stdout).toMatch(/scripts\/setup: ready \(\d+ Debian packages, \d+ tools, npm dependencies up to date\)\n$/);
    expect(r.code).toBe(0);
    expect(aptLog(dir)).toEqual([]);
  });

  it('stops with one line saying what to run when a package is missing, it is not root and there is no sudo', async () => {
    const dir = stubDir();
    const r = await run('/bin/bash', [SETUP, '--test'], { env: { PATH: dir, STUB_DIR: dir, STUB_UID: '1000', STUB_MISSING: 'gnutls-bin' } });
    expect(r.stdout).toBe(
      'scripts/setup: missing Debian packages, and why they are needed:\n' +
        '  gnutls-bin         certtool and psktool make the certificates and keys of the TLS tests\n',
    );
    expect(r.stderr).toBe('scripts/setup: missing Debian packages: gnutls-bin; run scripts/setup --test as root, or have root run: apt-get install gnutls-bin\n');
    // The README's troubleshooting section quotes it.
    expect(fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8')).toContain(`\n  ${r.stderr}`);
    expect(r.code).toBe(1);
    expect(aptLog(dir)).toEqual([]);
  });

  it('names the plain command in that message when the packages of npm start are missing', async () => {
    const dir = stubDir();
    const r = await run('/bin/bash', [SETUP], { env: { PATH: dir, STUB_DIR: dir, STUB_UID: '1000', STUB_MISSING: 'build-essential python3' } });
    expect(r.stderr).toBe(
      'scripts/setup: missing Debian packages: build-essential python3; run scripts/setup as root, or have root run: apt-get install build-essential python3\n',
    );
    expect(r.code).toBe(1);
  });

  it('lists what is missing with --check and exits 1 without calling apt-get', async () => {
    const dir = stubDir();
    const r = await run('/bin/bash', [SETUP, '--test', '--check'], {
      env: { PATH: `${dir}:${process.env.PATH}`, STUB_DIR: dir, STUB_UID: '0', STUB_MISSING: 'fio tgt' },
    });
    expect(r.stdout).toBe(
      'scripts/setup: missing Debian packages, and why they are needed:\n' +
        '  fio                fio with ioengine=nbd, verify workloads\n' +
        '  tgt                tgtd, the reference iSCSI target\n',
    );
    expect(r.stderr).toBe('');
    expect(r.code).toBe(1);
    expect(aptLog(dir)).toEqual([]);
  });

  it('installs only the missing packages as root, then checks every tool and finishes ready', async () => {
    const dir = stubDir();
    const r = await run('/bin/bash', [SETUP, '--test'], {
      env: { PATH: `${dir}:${process.env.PATH}`, STUB_DIR: dir, STUB_UID: '0', STUB_MISSING: 'gnutls-bin' },
    });
    expect(aptLog(dir)).toEqual(['update', 'install -y --no-install-recommends gnutls-bin']);
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/scripts\/setup: apt-get install gnutls-bin\nscripts\/setup: ready \(\d+ Debian packages, \d+ tools, npm dependencies up to date\)\n$/);
    expect(r.code).toBe(0);
  });

  it('fails when a tool is missing even though its package is installed', async () => {
    const dir = stubDir();
    // /usr/bin without certtool and psktool: dpkg says gnutls-bin is there, its tools are not.
    const binDir = path.join(top, 'usr-bin-without-gnutls');
    fs.mkdirSync(binDir);
    for (const t of fs.readdirSync('/usr/bin')) if (t !== 'certtool' && t !== 'psktool') fs.symlinkSync(path.join('/usr/bin', t), path.join(binDir, t));
    const env = { PATH: `${dir}:${binDir}:/usr/local/bin`, STUB_DIR: dir, STUB_UID: '1000', STUB_MISSING: '' };
    const r = await run('/bin/bash', [SETUP, '--test', '--check'], { env });
    expect(r.stderr).toBe('scripts/setup: certtool not found; psktool not found\n');
    expect(r.code).toBe(1);
    // npm start needs neither.
    expect((await run('/bin/bash', [SETUP, '--check'], { env })).code).toBe(0);
  });

  describe('on a fresh clone', () => {
    // The files scripts/setup looks at, copied as a clone has them; npm is a stub that logs.
    function freshClone(): { root: string; stubs: string; log: () => string[] } {
      const root = fs.mkdtempSync(path.join(top, 'clone-'));
      for (const f of ['scripts/setup', 'package.json', 'package-lock.json', 'native/sparse.c']) {
        fs.mkdirSync(path.dirname(path.join(root, f)), { recursive: true });
        fs.copyFileSync(path.join(ROOT, f), path.join(root, f));
      }
      const stubs = fs.mkdtempSync(path.join(top, 'npm-stub-'));
      fs.writeFileSync(path.join(stubs, 'npm'), `#!/bin/bash\necho "$* nodedir=$npm_config_nodedir" >> ${JSON.stringify(path.join(stubs, 'npm.log'))}\n`, { mode: 0o755 });
      const f = path.join(stubs, 'npm.log');
      return { root, stubs, log: () => (fs.existsSync(f) ? fs.readFileSync(f, 'utf8').trim().split('\n') : []) };
    }
    // Where scripts/setup finds the Node headers, as it looks for them.
    const prefix = path.dirname(path.dirname(fs.realpathSync(process.execPath)));
    const nodedir = fs.existsSync(path.join(prefix, 'include/node/node_api.h')) ? prefix : '';
    const setupIn = (c: { root: string; stubs: string }, args: string[]) =>
      run('/bin/bash', [path.join(c.root, 'scripts/setup'), ...args], { env: { PATH: `${c.stubs}:${process.env.PATH}`, npm_config_nodedir: '' } });

    it('runs npm ci with the installed Node headers when node_modules is missing', async () => {
      const c = freshClone();
      const check = await setupIn(c, ['--test', '--check']);
      expect(check.stderr).toBe('');
      expect(check.stdout).toBe('scripts/setup: to do: npm ci (node_modules is missing)\n');
      expect(check.code).toBe(1);
      expect(c.log()).toEqual([]);
      const r = await setupIn(c, ['--test']);
      expect(r.stderr).toBe('');
      expect(r.stdout).toMatch(/^scripts\/setup: npm ci \(node_modules is missing\)\nscripts\/setup: ready /);
      expect(r.code).toBe(0);
      expect(c.log()).toEqual([`ci nodedir=${nodedir}`]);
    });

    it('runs npm ci again when package-lock.json is newer than node_modules', async () => {
      const c = freshClone();
      fs.mkdirSync(path.join(c.root, 'node_modules'));
      fs.writeFileSync(path.join(c.root, 'node_modules/.package-lock.json'), '{}');
      const old = new Date(Date.now() - 3600_000);
      fs.utimesSync(path.join(c.root, 'node_modules/.package-lock.json'), old, old);
      const r = await setupIn(c, ['--test']);
      expect(r.stdout).toContain('scripts/setup: npm ci (package-lock.json is newer than node_modules)\n');
      expect(c.log()).toEqual([`ci nodedir=${nodedir}`]);
    });

    it('builds what npm start needs when the dependencies are there but nothing is built', async () => {
      const c = freshClone();
      fs.mkdirSync(path.join(c.root, 'node_modules'));
      fs.writeFileSync(path.join(c.root, 'node_modules/.package-lock.json'), '{}');
      fs.mkdirSync(path.join(c.root, 'native/build/Release'), { recursive: true });
      fs.writeFileSync(path.join(c.root, 'native/build/Release/sparse.node'), '');
      const r = await setupIn(c, []);
      expect(r.stdout).toContain('scripts/setup: npm run build (dist/ is older than src/)\n');
      expect(c.log()).toEqual([`run build nodedir=${nodedir}`]);
      // npm test builds by itself: --test leaves dist/ alone.
      expect((await setupIn(c, ['--test', '--check'])).code).toBe(0);
    });
  });
});

describe('the README and .ci/run', () => {
  it('give exactly two commands: one starts the demo, one runs the whole suite, each after scripts/setup', () => {
    expect(readmeCommands()).toEqual(['scripts/setup && npm start', 'scripts/setup --test && npm test']);
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
    expect(pkg.scripts.start).toBe('node --max-semi-space-size=4 bin/blockmirror.js up -c config/demo.yaml');
    expect(pkg.scripts.test).toMatch(/vitest run$/);
  });

  it('has .ci/run run the README test command word for word', async () => {
    const r = await run('bash', [CI_RUN, '--print-test-command']);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`${readmeCommands()[1]}\n`);
    // ...and what it prints is what it runs.
    expect(fs.readFileSync(CI_RUN, 'utf8')).toMatch(/^bash -c "\$test_command" <\/dev\/null$/m);
  });
});
