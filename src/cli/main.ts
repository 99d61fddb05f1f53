// The composition root: parse the command line, wire the layers, run.
import fs from 'node:fs';
import { Command, CommanderError, Option } from 'commander';
import { UsageError } from './errors.js';
import { AdminUnreachableError } from '../admin/errors.js';
import { addExamples } from './examples.js';

type Register = (program: Command) => void;

// Each module registers its top-level commands; a command line loads only the module of the
// command it names (issue 18: `--version` and `status` must not pay for fastify, the NBD server
// or iSCSI). In this order, which is the order of `--help`.
const MODULES: { names: string[]; load: () => Promise<Register> }[] = [
  { names: ['serve'], load: async () => (await import('./serve.js')).serveCommand },
  { names: ['up'], load: async () => (await import('./up.js')).registerUpCommand },
  { names: ['status'], load: async () => (await import('./status.js')).registerStatusCommand },
  { names: ['apply'], load: async () => (await import('./apply.js')).registerApplyCommand },
  { names: ['pair'], load: async () => (await import('./pair.js')).registerPairCommand },
  { names: ['cfs'], load: async () => (await import('./cfs.js')).registerCfsCommand },
  { names: ['fault'], load: async () => (await import('./fault.js')).registerFaultCommand },
  { names: ['gateway', 'etcd'], load: async () => (await import('./gateway.js')).registerGatewayCommand },
  { names: ['admin'], load: async () => (await import('./admin.js')).registerAdminCommand },
  { names: ['xfer'], load: async () => (await import('./xfer.js')).registerXferCommand },
  { names: ['svol'], load: async () => (await import('./svol.js')).registerSvolCommand },
  // completion prints the whole tree, so naming it loads every module (see modulesFor).
  { names: ['completion'], load: async () => (await import('./completion.js')).registerCompletionCommand },
];

/** Global options that take a value: their value is not the command's name. */
const VALUE_OPTIONS = new Set(['--log-level']);

/**
 * Which modules a command line needs: the one of the command it names; none for a bare
 * --version; all of them for anything else (help, completion, a mistyped command, which
 * commander then answers with the whole tree in view).
 */
export function modulesFor(args: string[]): typeof MODULES {
  let name: string | undefined;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') break;
    if (!a.startsWith('-')) {
      name = a;
      break;
    }
    if (VALUE_OPTIONS.has(a)) i++;
  }
  if (name === undefined) return args.some((a) => a === '-V' || a === '--version') && !args.some((a) => a === '-h' || a === '--help') ? [] : MODULES;
  const one = MODULES.find((m) => m.names.includes(name));
  return one && name !== 'completion' ? [one] : MODULES;
}

/**
 * Write `text` to standard output (1) or error (2) with write(2), not through process.stdout or
 * stderr: their first use loads node:stream and a stream class (~30 M instructions, a sixth of
 * `--version`, issue 18), which --version, --help and the usage errors need for nothing else.
 * Everything is written before this returns, because its callers exit right after (process.exit).
 * A descriptor set non-blocking (O_NONBLOCK on a description shared with another process) may
 * refuse with EAGAIN while its pipe is full; then it is tried again every millisecond, as a
 * blocking write would wait for the reader. Before, the rest went to process.stdout's queue and
 * process.exit dropped it: `--version` into a full pipe printed nothing. With no reader left
 * (EPIPE) or no descriptor, there is nowhere to write, and nothing is.
 */
export function say(fd: 1 | 2, text: string): void {
  const buf = Buffer.from(text);
  let done = 0;
  while (done < buf.length) {
    try {
      done += fs.writeSync(fd, buf, done);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') return;
      Atomics.wait((pause ??= new Int32Array(new SharedArrayBuffer(4))), 0, 0, 1);
    }
  }
}
let pause: Int32Array | undefined;

/** The program with the commands `args` (the command line after `node script`) needs; all without. */
export async function buildProgram(args?: string[]): Promise<Command> {
  const program = new Command('blockmirror')
    .description('Storage-system emulator: mirrored volumes exported over NBD')
    .version('0.1.0')
    .addOption(new Option('--log-level <level>', 'fatal, error, warn, info, debug, trace or silent').default('info'))
    .showHelpAfterError(false)
    .exitOverride()
    .configureOutput({ outputError: () => {}, writeOut: (s) => say(1, s), writeErr: (s) => say(2, s) });
  const registers = await Promise.all((args === undefined ? MODULES : modulesFor(args)).map((m) => m.load()));
  for (const register of registers) register(program);
  addExamples(program);
  return program;
}

/** What to do about an error the command could not say itself (it does not know the YAML's path). */
function nextStep(err: unknown, argv: string[]): string {
  if (err instanceof AdminUnreachableError && err.ss !== undefined) {
    const i = argv.findIndex((a) => a === '-c' || a === '--config');
    const file = i >= 0 ? argv[i + 1] : argv.find((a) => a.startsWith('--config='))?.slice('--config='.length);
    return `; start it on its host (blockmirror up${file ? ` -c ${file}` : ''} --only ${err.ss}) or check its admin address`;
  }
  return '';
}

export async function main(argv: string[]): Promise<void> {
  try {
    const program = await buildProgram(argv.slice(2));
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help and --version land here too, with exit code 0; a bare command group prints its help.
      if (err.exitCode === 0) process.exit(0);
      if (err.code === 'commander.help') process.exit(2);
      say(2, `blockmirror: ${err.message.replace(/^error: /, '')}\n`);
      process.exit(2);
    }
    if (err instanceof UsageError) {
      say(2, `blockmirror: ${err.message}\n`);
      process.exit(2);
    }
    say(2, `blockmirror: ${err instanceof Error ? err.message : String(err)}${nextStep(err, argv)}\n`);
    process.exit(1);
  }
}
