// `blockmirror admin token`: print a storage system's admin token, or its dashboard's address
// with the token in the fragment (which the browser never sends to the server).
import type { Command } from 'commander';
import { UsageError } from './errors.js';
import { loadConfigOrUsage } from './status.js';

export function registerAdminCommand(program: Command): void {
  const admin = program
    .command('admin')
    .description('the admin API’s credentials')
    .argument('[command]')
    .allowExcessArguments()
    .usage('token -c <file> [--ss <id>] [--url]')
    .action((sub: string | undefined) => {
      throw new UsageError(sub === undefined ? 'admin: missing command (token)' : `admin: unknown command "${sub}" (expected token)`);
    });

  admin
    .command('token')
    .description("print a storage system's admin token (made by `blockmirror up` on its first start)")
    .requiredOption('-c, --config <file>', 'cluster configuration (YAML)')
    .option('--ss <id>', 'storage system (default: the first in the file)')
    .option('--url', "print the dashboard's address with the token instead")
    .action(async (opts: { config: string; ss?: string; url?: boolean }) => {
      const { clientAdminToken } = await import('../cluster/admin-token.js');
      const config = await loadConfigOrUsage(opts.config);
      const id = opts.ss === undefined ? config.storageSystems[0]!.id : Number(opts.ss);
      const ss = config.storageSystems.find((s) => s.id === id);
      if (!ss) throw new UsageError(`--ss: ${opts.config} has no storage system ${opts.ss} (it has ${config.storageSystems.map((s) => s.id).join(', ')})`);
      const token = clientAdminToken(config, id);
      if (!token) throw new UsageError(`storage system ${id} has no admin token yet: start it with blockmirror up -c ${opts.config} (it makes one), or set BLOCKMIRROR_ADMIN_TOKEN`);
      const host = ss.admin.host.includes(':') ? `[${ss.admin.host}]` : ss.admin.host === '0.0.0.0' ? '127.0.0.1' : ss.admin.host;
      const scheme = config.security.adminTls ? 'https' : 'http';
      process.stdout.write(opts.url ? `${scheme}://${host}:${ss.admin.port}/#token=${token}\n` : `${token}\n`);
    });
}
