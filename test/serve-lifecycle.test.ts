// serve's life: SIGTERM answers what is in flight, flushes, and exits 0,
// whether clients came and went or are still connected.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { connect } from '../src/nbd/client.js';
import { CLI, run, startServe, tmpDir } from './helpers/servers.js';

describe('blockmirror serve lifecycle', () => {
  it('exits 0 on SIGTERM after clients connected and left', async () => {
    const s = await startServe(['--size', '16MiB']);
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 1M', s.uri])).code).toBe(0);
    expect((await run('nbdinfo', ['--size', s.uri])).stdout.trim()).toBe(String(16 * 1024 * 1024));
    expect(await s.stop('SIGTERM')).toBe(0);
    expect(s.stderr()).toMatch(/stopped/);
  });

  it('answers the requests in flight, flushes the file and exits 0 on SIGTERM with a client still connected', async () => {
    const dir = tmpDir();
    const file = path.join(dir, 'disk.img');
    const s = await startServe(['--size', '16MiB', '--file', file]);
    const c = await connect(s.uri);
    const writes = Array.from({ length: 32 }, (_, i) => c.pwrite(Buffer.alloc(256 * 1024, i + 1), i * 256 * 1024));
    await writes[0];
    const code = s.stop('SIGTERM');
    const results = await Promise.allSettled(writes);
    expect(await code).toBe(0);
    // Every write the server acknowledged is in the file.
    const data = fs.readFileSync(file);
    results.forEach((r, i) => {
      if (r.status === 'fulfilled') expect(data[i * 256 * 1024]).toBe(i + 1);
    });
    expect(results.filter((r) => r.status === 'fulfilled').length).toBeGreaterThan(0);
    await c.close();
  });

  it('takes its sockets from the activating ancestor when a wrapper spawned it without fd 3 (as npx does)', async () => {
    // A Node parent that runs the CLI with stdio 'inherit' passes fds 0-2 only, exactly like `npx blockmirror`,
    // and forwards SIGTERM to it as npm does (libnbd stops the captive server with SIGTERM).
    const wrapper = [
      `const c = require('child_process').spawn(process.execPath, ${JSON.stringify([CLI, 'serve', '--size', '3MiB', '--log-level', 'warn'])}, { stdio: 'inherit' });`,
      `process.on('SIGTERM', () => c.kill('SIGTERM'));`,
      `c.on('exit', (code) => process.exit(code ?? 1));`,
    ].join('\n');
    const r = await run('nbdinfo', ['--size', '--', '[', process.execPath, '-e', wrapper, ']'], { timeoutMs: 30_000 });
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe(String(3 * 1024 * 1024));
  });
});
