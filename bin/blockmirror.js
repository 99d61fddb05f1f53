#!/usr/bin/env node
import fs from 'node:fs';
// File volumes do their I/O on libuv's thread pool; its default of 4 threads
// caps a file export at 4 requests in flight. Set before anything uses the pool.
process.env.UV_THREADPOOL_SIZE ??= '16';
// dist/bundle/ (scripts/bundle-cli.mjs) starts faster than dist/ module by module; it is used
// only when at least as new as dist/cli/main.js, so a `tsc` without the bundle step never runs
// stale code. BLOCKMIRROR_NO_BUNDLE=1 runs dist/ (for stack traces with the original files).
const bundle = new URL('../dist/bundle/cli.js', import.meta.url);
const plain = new URL('../dist/cli/main.js', import.meta.url);
const mtime = (u) => fs.statSync(u, { throwIfNoEntry: false })?.mtimeMs ?? -1;
const useBundle = !process.env.BLOCKMIRROR_NO_BUNDLE && mtime(bundle) >= mtime(plain) && mtime(plain) >= 0;
const { main } = await import(useBundle ? bundle.href : plain.href);
await main(process.argv);
