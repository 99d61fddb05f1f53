#!/usr/bin/env -S node --max-semi-space-size=4
// --max-semi-space-size=4 (MiB): V8's young generation otherwise grows to 16 MiB per semi-space,
// and a server's RSS with it (a 10-minute soak peaked at 149 MiB with the default, 128 with 4, the
// issue's limit being 150); 1 MiB and 4 KiB jobs against nbdkit were not slower (bench/RESULTS.md,
// "Soak"). Whoever starts this file with `node` directly (systemd units, npm start, the benchmarks
// through bench/lib/proc.js NODE_FLAGS) passes the same flags.
// CommonJS (bin/package.json), not an ES module: Node 20 then runs it without starting its ES module
// loader, and without the ES facade of node:fs, which reads every export of fs and so loads
// fs.ReadStream and all of node:stream (issue 18: `--version` 199 -> 152 M instructions, counted with
// valgrind, with the flag above; the flag makes Node compile its own modules from source, as V8
// rejects their built-in code cache under a non-default V8 flag, so every one of them counts).
'use strict';
const fs = require('node:fs');
const path = require('node:path');
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
const plain = path.join(__dirname, '../dist/cli/main.js');
const cjs = path.join(__dirname, '../dist/bundle-cjs/cli.cjs');
const esm = path.join(__dirname, '../dist/bundle/cli.js');
const mtime = (f) => fs.statSync(f, { throwIfNoEntry: false })?.mtimeMs ?? -1;
const fresh = (f) => !process.env.BLOCKMIRROR_NO_BUNDLE && mtime(f) >= mtime(plain) && mtime(plain) >= 0;
const run = async () => {
  let main;
  if (fresh(cjs)) {
    ({ main } = require('./code-cache.js').loadCachedBundle(cjs));
  } else {
    ({ main } = await import(require('node:url').pathToFileURL(fresh(esm) ? esm : plain).href));
  }
  await main(process.argv);
};
// main() answers every error of a command itself; anything else is a bug, and ends the process as
// an uncaught exception would.
run().catch((err) => {
  process.nextTick(() => {
    throw err;
  });
});
