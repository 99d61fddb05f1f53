// `blockmirror pair split|resync NAME -c FILE`: send a pair command to the
// storage system that holds the pair's master (it runs the pair) and print the
// state the pair is in afterwards, e.g. "pair1: PSUS".
import type { Command } from 'commander';
import { pairCommand, type PairCommand } from '../admin/client.js';
import { UsageError } from './errors.js';
import { adminEndpoint, loadConfigOrUsage, parseTimeout } from './status.js';

export const DEFAULT_PAIR_TIMEOUT_MS = 10_000;

interface PairOptions {
  config: string;
  timeout: string;
}

const COMMANDS: { command: PairCommand; description: string }[] = [
  { command: 'split', description: 'stop mirroring: the mirrors keep a point-in-time image and become writable; changes are tracked (PAIR -> PSUS)' },
  { command: 'resync', description: 'copy what changed since the split back to the mirrors and resume mirroring (PSUS/PSUE -> COPY -> PAIR)' },
];

export function registerPairCommand(program: Command): void {
  const pair = program
    .command('pair')
    .description('split or resync a mirrored pair (through its master storage system)')
    // Without this, a missing or mistyped subcommand ends in commander's help text and exit code 1.
    .argument('[command]')
    .allowExcessArguments()
    .usage('split|resync <name> -c <file>')
    .action((sub: string | undefined) => {
      const expected = COMMANDS.map((c) => c.command).join(' or ');
      throw new UsageError(sub === undefined ? `pair: missing command (${expected})` : `pair: unknown command "${sub}" (expected ${expected})`);
    });
  for (const { command, description } of COMMANDS) {
    pair
      .command(`${command} <name>`)
      .description(description)
      .allowExcessArguments(false)
      .requiredOption('-c, --config <file>', 'cluster configuration (YAML)')
      .option('--timeout <ms>', 'how long to wait for the storage system', String(DEFAULT_PAIR_TIMEOUT_MS))
      .action(async (name: string, opts: PairOptions) => {
        const status = await runPairCommand(opts.config, name, command, parseTimeout(opts.timeout));
        process.stdout.write(`${status.name}: ${status.state}\n`);
      });
  }
}

async function runPairCommand(configPath: string, name: string, command: PairCommand, timeoutMs: number) {
  const config = loadConfigOrUsage(configPath);
  const pair = config.pairs.find((p) => p.name === name);
  if (pair === undefined) {
    const known = config.pairs.map((p) => p.name);
    throw new UsageError(`unknown pair "${name}" (${configPath} has ${known.length === 0 ? 'no pairs' : known.join(', ')})`);
  }
  const master = config.storageSystems.find((s) => s.id === pair.master.ss);
  // loadConfig checks this; a second look costs nothing and keeps the message clear.
  if (master === undefined) throw new UsageError(`pair ${name}: master storage system ${pair.master.ss} is not in ${configPath}`);
  // AdminReplyError (404, 409) and AdminUnreachableError are one line each and end in exit code 1.
  return pairCommand(adminEndpoint(master), name, command, timeoutMs);
}
