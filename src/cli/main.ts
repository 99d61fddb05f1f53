// The composition root: parse the command line, wire the layers, run.
import { Command, CommanderError, Option } from 'commander';
import { serveCommand } from './serve.js';
import { registerUpCommand } from './up.js';
import { registerStatusCommand } from './status.js';
import { registerApplyCommand } from './apply.js';
import { registerPairCommand } from './pair.js';
import { registerCfsCommand } from './cfs.js';
import { registerFaultCommand } from './fault.js';
import { registerGatewayCommand } from './gateway.js';
import { registerAdminCommand } from './admin.js';
import { registerCompletionCommand } from './completion.js';
import { registerXferCommand } from './xfer.js';
import { registerSvolCommand } from './svol.js';
import { UsageError } from './errors.js';
import { addExamples } from './examples.js';

export function buildProgram(): Command {
  const program = new Command('blockmirror')
    .description('Storage-system emulator: mirrored volumes exported over NBD')
    .version('0.1.0')
    .addOption(new Option('--log-level <level>', 'fatal, error, warn, info, debug, trace or silent').default('info'))
    .showHelpAfterError(false)
    .exitOverride()
    .configureOutput({ outputError: () => {} });
  serveCommand(program);
  registerUpCommand(program);
  registerStatusCommand(program);
  registerApplyCommand(program);
  registerPairCommand(program);
  registerCfsCommand(program);
  registerFaultCommand(program);
  registerGatewayCommand(program);
  registerAdminCommand(program);
  registerXferCommand(program);
  registerSvolCommand(program);
  registerCompletionCommand(program);
  addExamples(program);
  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help and --version land here too, with exit code 0; a bare command group prints its help.
      if (err.exitCode === 0) process.exit(0);
      if (err.code === 'commander.help') process.exit(2);
      process.stderr.write(`blockmirror: ${err.message.replace(/^error: /, '')}\n`);
      process.exit(2);
    }
    if (err instanceof UsageError) {
      process.stderr.write(`blockmirror: ${err.message}\n`);
      process.exit(2);
    }
    process.stderr.write(`blockmirror: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  }
}
