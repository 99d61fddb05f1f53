// Every command's --help ends with an example, and `blockmirror completion bash` completes the
// command tree: the script is sourced in a real bash and asked for COMPREPLY, as bash does on TAB.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { afterAll, describe, expect, it } from 'vitest';
import { buildProgram, modulesFor } from '../src/cli/main.js';
import { allCommands, commandPath } from '../src/cli/examples.js';
import { bashCompletion } from '../src/cli/completion.js';
import { CLI, ROOT, run, tmpDir } from './helpers/servers.js';

const top = tmpDir('bm-cli-help-');
afterAll(() => fs.rmSync(top, { recursive: true, force: true }));

/** What `--help` prints for a command, captured in-process. */
function helpOf(cmd: Command): string {
  let out = '';
  cmd.configureOutput({ writeOut: (s) => (out += s), writeErr: (s) => (out += s) });
  cmd.outputHelp();
  return out;
}

/** COMPREPLY, one word a line, for the command line `line` with the cursor at its end. */
async function complete(line: string, cwd = top): Promise<string[]> {
  const script = path.join(top, 'completion.bash');
  if (!fs.existsSync(script)) {
    const r = await run(process.execPath, [CLI, 'completion', 'bash']);
    expect(r.code).toBe(0);
    fs.writeFileSync(script, r.stdout);
  }
  const driver = `source ${JSON.stringify(script)}
read -r -a COMP_WORDS <<< "$LINE"
[[ "$LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((\${#COMP_WORDS[@]} - 1))
_blockmirror
printf '%s\\n' "\${COMPREPLY[@]}"
`;
  const r = await run('bash', ['--norc', '-c', driver], { env: { LINE: line }, cwd });
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  return r.stdout.split('\n').filter((w) => w !== '');
}

describe('--help', () => {
  it('ends with an Example section on every command of the tree', async () => {
    const commands = allCommands(await buildProgram());
    expect(commands.length).toBeGreaterThan(25);
    for (const cmd of commands) {
      const help = helpOf(cmd);
      expect(help, `blockmirror ${commandPath(cmd)} --help`).toMatch(/\n\nExamples?:\n(  .+\n)+$/);
      // The example uses the command it documents.
      const shown = help.slice(help.lastIndexOf('Example'));
      expect(shown, commandPath(cmd)).toContain(commandPath(cmd) === '' ? 'blockmirror ' : `blockmirror ${commandPath(cmd)}`);
    }
  });

  it('shows apply and pair create with their examples', async () => {
    const program = await buildProgram();
    const find = (p: string) => allCommands(program).find((c) => commandPath(c) === p)!;
    expect(helpOf(find('apply'))).toMatch(/\n\nExamples:\n {2}blockmirror apply -c config\/demo\.yaml --dry-run {4}# print what would change\n/);
    expect(helpOf(find('pair create'))).toContain('\n\nExample:\n  blockmirror pair create pair3 -c config/demo.yaml --master 1:9 --mirror 1:10 --mode sync --wait\n');
    expect(helpOf(find('pair delete'))).toContain('\n\nExample:\n  blockmirror pair delete pair3 -c config/demo.yaml\n');
  });

  it('is printed by the real CLI with the example, exit code 0', async () => {
    const r = await run(process.execPath, [CLI, 'fault', 'clear', '--help']);
    expect(r.stdout).toMatch(/\n\nExample:\n {2}blockmirror fault clear -c config\/demo\.yaml 1:7\n$/);
    expect(r.code).toBe(0);
  });
});

describe('a command line loads only the module of its command', () => {
  it('builds each top-level command alone exactly as the whole program has it, help text included', async () => {
    const whole = await buildProgram();
    const names = whole.commands.map((c) => c.name());
    expect(names.length).toBeGreaterThan(10);
    for (const name of names) {
      // completion prints the whole tree; help is commander's own and needs it too.
      if (name === 'completion' || name === 'help') continue;
      expect(modulesFor([name]).length, name).toBe(1);
      const alone = await buildProgram(['--log-level', 'warn', name, '--help']);
      expect(alone.commands.length, name).toBeLessThan(names.length);
      for (const cmd of allCommands(whole.commands.find((c) => c.name() === name)!)) {
        const twin = allCommands(alone).find((c) => c !== alone && commandPath(c) === commandPath(cmd));
        expect(twin, commandPath(cmd)).toBeDefined();
        expect(helpOf(twin!), commandPath(cmd)).toBe(helpOf(cmd));
      }
    }
  });

  it('loads no command module for --version, and every one for help, completion or an unknown command', () => {
    const all = modulesFor([]).length;
    expect(all).toBeGreaterThan(10);
    expect(modulesFor(['--version'])).toEqual([]);
    expect(modulesFor(['-V'])).toEqual([]);
    expect(modulesFor(['--version', '--help']).length).toBe(all);
    expect(modulesFor(['help', 'status']).length).toBe(all);
    expect(modulesFor(['completion', 'bash']).length).toBe(all);
    expect(modulesFor(['nosuch']).length).toBe(all);
    // The value of a global option is not a command name.
    expect(modulesFor(['--log-level', 'status', 'up']).map((m) => m.names)).toEqual([['up']]);
  });

  it('prints the version without any command module, and runs a command given after a global option', async () => {
    const v = await run(process.execPath, [CLI, '--version']);
    expect(v.stdout).toBe('0.1.0\n');
    expect(v.code).toBe(0);
    const bad = await run(process.execPath, [CLI, '--log-level', 'warn', 'status']);
    expect(bad.stderr).toBe("blockmirror: required option '-c, --config <file>' not specified\n");
    expect(bad.code).toBe(2);
  });
});

describe('the bundled CLI (dist/bundle/, scripts/bundle-cli.mjs)', () => {
  it('is what bin/ runs after npm run build, and answers as dist/ module by module does: help, completion and YAML errors', async () => {
    // bin/blockmirror.js takes the bundle only when it is not older than dist/cli/main.js.
    const mtime = (f: string) => fs.statSync(path.join(ROOT, f)).mtimeMs;
    expect(mtime('dist/bundle/cli.js')).toBeGreaterThanOrEqual(mtime('dist/cli/main.js'));
    const bad = path.join(top, 'bad.yaml');
    fs.writeFileSync(bad, 'storageSystems:\n  - id: 1\n    nbd: 127.0.0.1:10809\n    admin: nowhere\n    volumes: []\n');
    for (const args of [['pair', 'split', '--help'], ['completion', 'bash'], ['status', '-c', bad], ['cfs', 'ls', '-c', bad]]) {
      const bundled = await run(process.execPath, [CLI, ...args]);
      const plain = await run(process.execPath, [CLI, ...args], { env: { BLOCKMIRROR_NO_BUNDLE: '1' } });
      expect(bundled, args.join(' ')).toEqual(plain);
      expect(bundled.stdout + bundled.stderr, args.join(' ')).not.toBe('');
    }
  });

  it('imports buffer-layout, @node-rs/crc32 and @node-rs/xxhash without an ES import of CommonJS, which Node 20 lexes at every start', () => {
    // An ES import of a CommonJS package makes Node lex its source for export names, in code not
    // yet compiled: 80-100 ms of CPU each for buffer-layout and @node-rs/crc32 in every CLI process. buffer-layout is
    // bundled, the native @node-rs packages are loaded with require() (src/util/crc32c.ts, xxh64.ts).
    const dir = path.join(ROOT, 'dist/bundle');
    const files = fs.readdirSync(dir).filter((f) => f.endsWith('.js'));
    const esImport = /^import\b[^;]*?from\s*["'](buffer-layout|@node-rs\/crc32|@node-rs\/xxhash)["']/m;
    const offenders = files.filter((f) => esImport.test(fs.readFileSync(path.join(dir, f), 'utf8')));
    expect(offenders).toEqual([]);
    expect(files.some((f) => /requireNapi\w*\("@node-rs\/crc32"\)/.test(fs.readFileSync(path.join(dir, f), 'utf8')))).toBe(true);
    const sources = (fs.readdirSync(path.join(ROOT, 'src'), { recursive: true }) as string[]).filter((f) => f.endsWith('.ts'));
    expect(sources.filter((f) => /^import [^;]*from '@node-rs\/(crc32|xxhash)'/m.test(fs.readFileSync(path.join(ROOT, 'src', f), 'utf8')))).toEqual([]);
  });
});

describe('output into a full pipe', () => {
  it('prints --version and --help whole into a non-blocking pipe that is full when it writes, once the reader drains it', async () => {
    // O_NONBLOCK on the pipe's description (as another process sharing it may set), the pipe
    // filled to the last byte: the first write(2) gets EAGAIN. The command must wait for the
    // reader, not exit having written nothing. The reader drains only once the command has
    // exited or 3 s have passed; the old code exited at once, output lost.
    const harness = `
import fcntl, json, os, subprocess, sys
r, w = os.pipe()
fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
filler = 0
try:
    while True:
        filler += os.write(w, b'x' * 4096)
except BlockingIOError:
    pass
try:
    while True:
        filler += os.write(w, b'x')
except BlockingIOError:
    pass
p = subprocess.Popen(sys.argv[1:], stdout=w)
os.close(w)
try:
    code = p.wait(timeout=3)
    exited_before_drain = True
except subprocess.TimeoutExpired:
    exited_before_drain = False
data = b''
while True:
    chunk = os.read(r, 65536)
    if not chunk:
        break
    data += chunk
code = p.wait()
print(json.dumps({'code': code, 'filler': filler, 'out': data[filler:].decode(), 'exitedBeforeDrain': exited_before_drain}))
`;
    const version = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version as string;
    const help = await run(process.execPath, [CLI, '--help']);
    for (const [args, want] of [[['--version'], `${version}\n`], [['--help'], help.stdout]] as const) {
      const r = await run('python3', ['-c', harness, process.execPath, CLI, ...args], { timeoutMs: 60_000 });
      expect(r.stderr).toBe('');
      const got = JSON.parse(r.stdout);
      expect(got.filler, 'the pipe was filled').toBeGreaterThan(0);
      expect(got.code).toBe(0);
      expect(got.out, args.join(' ')).toBe(want);
      // It waited for the reader rather than exiting.
      expect(got.exitedBeforeDrain).toBe(false);
    }
  }, 60_000);
});

describe('the napi-rs packages', () => {
  it('load their glibc x64 binary directly, without the package loader (its platform probe), and give the same checksums; a package without one loads as usual', async () => {
    const probe = `
      import { createRequire } from 'node:module';
      const { crc32c } = await import(${JSON.stringify(path.join(ROOT, 'dist/util/crc32c.js'))});
      const { xxh64Low } = await import(${JSON.stringify(path.join(ROOT, 'dist/util/xxh64.js'))});
      const { requireNapi } = await import(${JSON.stringify(path.join(ROOT, 'dist/util/napi.js'))});
      const req = createRequire(${JSON.stringify(path.join(ROOT, 'dist/util/napi.js'))});
      const commander = requireNapi('commander');
      console.log(JSON.stringify({
        crc: crc32c(Buffer.from('123456789')),
        xxh: xxh64Low(Buffer.from('')),
        loaded: Object.keys(req.cache).filter((k) => k.includes('@node-rs')).map((k) => k.slice(k.indexOf('@node-rs'))),
        commander: typeof commander.Command,
      }));`;
    const r = await run(process.execPath, ['--input-type=module', '-e', probe]);
    expect(r.stderr).toBe('');
    const out = JSON.parse(r.stdout);
    // The check values of CRC-32C ("123456789") and of XXH64 (empty input, seed 0: 0xef46db3751d8e999).
    expect(out.crc).toBe(0xe3069283);
    expect(out.xxh).toBe(0x51d8e999);
    expect(out.loaded.sort()).toEqual(['@node-rs/crc32-linux-x64-gnu/crc32.linux-x64-gnu.node', '@node-rs/xxhash-linux-x64-gnu/xxhash.linux-x64-gnu.node']);
    expect(out.commander).toBe('function');
  });
});

describe('what a CLI process loads at start', () => {
  it('runs --version, xfer send --help and xfer format and ls on a file without node:http (the admin client), which every command paid for, nor node:child_process (commander\'s, for executable subcommands) or, but in format, node:crypto', async () => {
    // The entry point tells AdminUnreachableError apart (src/admin/errors.ts); it used to import
    // it from the admin client, and with it node:http, into every process.
    const probe = path.join(top, 'loaded.mjs');
    fs.writeFileSync(probe, "process.on('exit', () => process.stderr.write(`loaded: ${process.moduleLoadList.filter((m) => /^NativeModule (http|_http_client|https|crypto|child_process|dgram)$/.test(m)).map((m) => m.slice('NativeModule '.length)).join(',') || 'none'}\\n`));\n");
    const dev = path.join(top, 'xfer.vol');
    fs.writeFileSync(dev, '');
    fs.truncateSync(dev, 8 << 20);
    const runs: [string, string[]][] = [
      ['--version', ['--version']],
      ['xfer send --help', ['xfer', 'send', '--help']],
      ['xfer format', ['xfer', 'format', dev, '--seg-size', '64KiB', '--segments', '8', '--max-conn', '2']],
      ['xfer ls', ['xfer', 'ls', '--dev', dev]],
    ];
    for (const [what, args] of runs) {
      const r = await run(process.execPath, ['--import', probe, CLI, ...args]);
      expect(r.code, `${what}: ${r.stderr}`).toBe(0);
      // format makes the volume's random ID: node:crypto there, and only there.
      expect(r.stderr, what).toContain(what === 'xfer format' ? 'loaded: crypto\n' : 'loaded: none\n');
    }
    // The probe does see node:http where it is loaded: in the command that uses the admin client.
    const status = await run(process.execPath, ['--import', probe, CLI, 'status', '--help']);
    expect(status.code).toBe(0);
    expect(status.stderr).toMatch(/loaded: (\S*,)?http\b/);
  });
});

describe('what --version and a mistyped command load', () => {
  it('run without Node\'s ES module loader (bin/ is CommonJS) and without the stream classes of process.stdout and stderr (the answer goes out with write(2))', async () => {
    // Both cost --version a third of its start-up under the shebang's V8 flag, which makes Node
    // compile its own modules from source. -r, not --import: --import would start the ES loader;
    // and the probe writes with write(2) too. (node:stream itself comes with node:zlib, whose
    // CRC-32 checks the code cache.)
    const probe = path.join(top, 'loaded.cjs');
    fs.writeFileSync(probe, "process.on('exit', () => require('fs').writeSync(2, `loaded: ${process.moduleLoadList.filter((m) => /^NativeModule (internal\\/modules\\/esm\\/translators|internal\\/fs\\/sync_write_stream|net|tty)$/.test(m)).map((m) => m.slice('NativeModule '.length)).join(',') || 'none'}\\n`));\n");
    const version = await run(process.execPath, ['-r', probe, CLI, '--version']);
    expect(version.stdout).toBe('0.1.0\n');
    expect(version.stderr).toBe('loaded: none\n');
    expect(version.code).toBe(0);
    const bad = await run(process.execPath, ['-r', probe, CLI, '--log-level', 'warn', 'nosuch']);
    // A mistyped command loads every command module (for the whole tree in view), some with
    // node:net; still no ES loader.
    expect(bad.stderr).toMatch(/^blockmirror: unknown command 'nosuch'\nloaded: .*\n$/);
    expect(bad.stderr).not.toContain('translators');
    expect(bad.code).toBe(2);
    // The probe does see them where they are loaded: help goes through process.stdout (commander
    // asks it for the terminal's width), a pipe here.
    const help = await run(process.execPath, ['-r', probe, CLI, 'pair', 'split', '--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).toContain('Usage: blockmirror pair split');
    expect(help.stderr).toMatch(/loaded: (\S*,)?net\b/);
  });
});

describe('blockmirror completion bash', () => {
  it('completes commands, subcommands, options and option values in bash', async () => {
    expect(await complete('blockmirror s')).toEqual(['serve', 'status', 'svol']);
    expect(await complete('blockmirror pair s')).toEqual(['split', 'swap']);
    expect(await complete('blockmirror pair c')).toEqual(['create']);
    expect((await complete('blockmirror apply --')).sort()).toEqual(['--config', '--dry-run', '--help', '--timeout', '--wait']);
    expect((await complete('blockmirror pair create pair3 --m')).sort()).toEqual(['--master', '--mirror', '--mode']);
    expect(await complete('blockmirror -c x.yaml pair split pair1 --t')).toEqual(['--timeout']);
    expect((await complete('blockmirror cfs m')).sort()).toEqual(['mkdir', 'mount', 'mv']);
    expect(await complete('blockmirror --log-level d')).toEqual(['debug']);
    expect(await complete('blockmirror completion ')).toEqual(['bash', '--help']);
    expect(await complete('blockmirror nosuch ')).toEqual(await complete('blockmirror '));
  });

  it('completes the value of -c as a file name', async () => {
    const dir = fs.mkdtempSync(path.join(top, 'files-'));
    fs.writeFileSync(path.join(dir, 'cluster.yaml'), '');
    fs.writeFileSync(path.join(dir, 'cfs.yaml'), '');
    expect((await complete('blockmirror up -c cl', dir)).sort()).toEqual(['cluster.yaml']);
    expect((await complete('blockmirror status -c c', dir)).sort()).toEqual(['cfs.yaml', 'cluster.yaml']);
  });

  it('offers every subcommand and long option of every command, because it is generated from the tree', async () => {
    const program = await buildProgram();
    for (const cmd of allCommands(program)) {
      const p = commandPath(cmd);
      const offered = await complete(`blockmirror ${p}${p === '' ? '' : ' '}`);
      const expected = [...cmd.commands.map((c) => c.name()), ...cmd.options.flatMap((o) => (o.long ? [o.long] : [])), '--help'];
      expect(offered, p).toEqual(expect.arrayContaining(expected));
    }
    // ...and the script is what the CLI prints.
    expect((await run(process.execPath, [CLI, 'completion', 'bash'])).stdout).toBe(bashCompletion(program));
  });
});
