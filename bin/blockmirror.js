#!/usr/bin/env -S node --max-semi-space-size=4
// --max-semi-space-size=4 (MiB): V8's young generation otherwise grows to 16 MiB per semi-space,
// and a server's RSS with it (a 10-minute soak peaked at 149 MiB with the default, 128 with 4, the
// issue's limit being 150); 1 MiB and 4 KiB jobs against nbdkit were not slower (bench/RESULTS.md,
// "Soak"). Whoever starts this file with `node` directly (systemd units, npm start, the benchmarks
// through bench/lib/proc.js NODE_FLAGS) passes the same flags.
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
// File volumes do their I/O on libuv's thread pool; its default of 4 threads
// caps a file export at 4 requests in flight. Set before anything uses the pool.
process.env.UV_THREADPOOL_SIZE ??= '16';
// What runs, first that applies (scripts/bundle-cli.mjs builds both bundles after tsc):
// | BLOCKMIRROR_NO_BUNDLE=1 | dist/ module by module (stack traces with the original files) |
// | dist/bundle-cjs/cli.cjs | one CommonJS chunk per command, through V8's code cache (bin/code-cache.js) |
// | dist/bundle/cli.js      | one ES chunk per command |
// | otherwise               | dist/ module by module |
// A bundle is used only when at least as new as dist/cli/main.js, so a `tsc` without the bundle
// step never runs stale code.
const plain = new URL('../dist/cli/main.js', import.meta.url);
const cjs = new URL('../dist/bundle-cjs/cli.cjs', import.meta.url);
const esm = new URL('../dist/bundle/cli.js', import.meta.url);
const mtime = (u) => fs.statSync(u, { throwIfNoEntry: false })?.mtimeMs ?? -1;
const fresh = (u) => !process.env.BLOCKMIRROR_NO_BUNDLE && mtime(u) >= mtime(plain) && mtime(plain) >= 0;
let main;
if (fresh(cjs)) {
  const { loadCachedBundle } = await import('./code-cache.js');
  ({ main } = loadCachedBundle(fileURLToPath(cjs)));
} else {
  ({ main } = await import(fresh(esm) ? esm.href : plain.href));
}
await main(process.argv);
