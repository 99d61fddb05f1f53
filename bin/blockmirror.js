#!/usr/bin/env node
// File volumes do their I/O on libuv's thread pool; its default of 4 threads
// caps a file export at 4 requests in flight. Set before anything uses the pool.
process.env.UV_THREADPOOL_SIZE ??= '16';
const { main } = await import('../dist/cli/main.js');
await main(process.argv);
