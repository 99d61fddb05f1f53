#!/usr/bin/env node
// No V8 flags on this line: any non-default V8 flag makes V8 reject the code cache of Node's own
// modules, and every command would compile them from source (15 ms of `status`). The server
// commands need --max-semi-space-size=4 for their RSS and restart themselves with it, in place,
// before anything else loads (bin/server-flags.js); the systemd units and `npm start` pass it.
// CommonJS (bin/package.json), not an ES module: Node 20 then runs it without starting its ES module
// loader, and without the ES facade of node:fs, which reads every export of fs and so loads
// fs.ReadStream and all of node:stream (issue 18: `--version` 199 -> 152 M instructions, counted with
// valgrind, when this line still had the flag and Node compiled its own modules from source).
'use strict';
require('./server-flags.js').restartWithServerFlags();
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
