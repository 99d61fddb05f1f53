#!/usr/bin/env node
// Bundle the compiled CLI (dist/cli/main.js) into dist/bundle/, which bin/blockmirror.js loads
// when it is at least as new as dist/cli/main.js (issue 18: start-up time). `npm run build` runs it
// after tsc.
//
// Why: Node 20 resolves, reads and compiles each ES module on its own, and a client command such
// as `status` loaded ~125 of them (zod alone is 94); one chunk per command costs a fraction of
// that (bench/RESULTS.md, "CLI start-up"). Each `import()` of the CLI stays a chunk of its own,
// so a command still loads only what it runs.
//
// What is bundled: our dist/ code and the pure-JS packages the client commands need (commander,
// zod, yaml), and buffer-layout: a CommonJS package that an ES import makes Node 20 lex at every
// start (~0.08 s of CPU; bench/RESULTS.md, "xfer, issue 17 third part"). Every other package stays
// an ordinary import from node_modules: pino starts its transports from files of its own, etcd3
// reads .proto files, fuse-native and the @node-rs packages are native (loaded with require(),
// src/util/crc32c.ts, xxh64.ts), and fastify is only for `up`.
//
// Paths: dist/bundle/ is as deep as dist/cli/, so the `new URL('../../…', import.meta.url)` of the
// native addon (blockdev/native.ts) and of the dashboard's page (admin/dashboard.ts) still land
// in native/ and src/admin/page/. The CFS read worker (cfs/datapath.ts: './read-worker.js') is an
// entry of its own, dist/bundle/read-worker.js, next to the chunk that starts it.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'rolldown';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const OUT = path.join(ROOT, 'dist', 'bundle');
const BUNDLED = ['commander', 'zod', 'yaml', 'buffer-layout'];

const bundled = (id) => BUNDLED.some((p) => id === p || id.startsWith(`${p}/`));
fs.rmSync(OUT, { recursive: true, force: true });
await build({
  input: { cli: path.join(ROOT, 'dist/cli/main.js'), 'read-worker': path.join(ROOT, 'dist/cfs/read-worker.js') },
  platform: 'node',
  // Bare specifiers (packages, node: built-ins) stay imports unless listed above.
  external: (id) => !id.startsWith('.') && !path.isAbsolute(id) && !bundled(id),
  logLevel: 'warn',
  output: { dir: OUT, format: 'esm', entryFileNames: '[name].js', chunkFileNames: '[name]-[hash].js' },
});
for (const f of ['cli.js', 'read-worker.js']) {
  if (!fs.existsSync(path.join(OUT, f))) throw new Error(`bundle-cli: ${f} was not written`);
}

// The same CLI once more as CommonJS in dist/bundle-cjs/, which bin/blockmirror.js runs through
// bin/code-cache.js: a vm.Script takes V8's code cache, an ES module does not in Node 20 (issue 18:
// `status` 312 -> 238 ms; bench/RESULTS.md, "CLI start-up"). The ES bundle above stays the fallback
// and holds the CFS read worker, which the CommonJS chunk starts through a one-line ES shim
// (`new URL('./read-worker.js', …)` resolves in dist/bundle-cjs/). Chunks end in .cjs because
// package.json says "type": "module".
const OUT_CJS = path.join(ROOT, 'dist', 'bundle-cjs');
fs.rmSync(OUT_CJS, { recursive: true, force: true });
await build({
  input: { cli: path.join(ROOT, 'dist/cli/main.js') },
  platform: 'node',
  external: (id) => !id.startsWith('.') && !path.isAbsolute(id) && !bundled(id),
  logLevel: 'warn',
  // dynamicImportInCjs: false turns `import('pino')` and the like into require(): an import() in a
  // vm.Script compiled from a code cache fails in Node 20 ("A dynamic import callback was not
  // specified"), and every package and built-in the CLI imports that way is CommonJS or built in.
  output: { dir: OUT_CJS, format: 'cjs', dynamicImportInCjs: false, entryFileNames: '[name].cjs', chunkFileNames: '[name]-[hash].cjs' },
});
fs.writeFileSync(path.join(OUT_CJS, 'read-worker.js'), "import '../bundle/read-worker.js';\n");
if (!fs.existsSync(path.join(OUT_CJS, 'cli.cjs'))) throw new Error('bundle-cli: bundle-cjs/cli.cjs was not written');
for (const f of fs.readdirSync(OUT_CJS).filter((n) => n.endsWith('.cjs'))) {
  const code = fs.readFileSync(path.join(OUT_CJS, f), 'utf8').replace(/\/\*[\s\S]*?\*\//g, '');
  if (/\bimport\s*\(/.test(code)) throw new Error(`bundle-cli: bundle-cjs/${f} has an import(), which fails from V8's code cache in Node 20; make it a require()`);
}
