// CRC32C (@node-rs/crc32, SIMD), loaded with require() rather than an ES import. Node 20 imports a
// CommonJS package into an ES module by lexing its source for the names it exports, in JavaScript
// not yet compiled at start-up: for this package that cost ~90 ms of CPU in every CLI process, a
// require() ~5 ms (bench/RESULTS.md, "xfer, issue 17 third part"); requireNapi skips the package's
// platform probe too (napi.ts).
import { requireNapi } from './napi.js';

type Crc32 = typeof import('@node-rs/crc32');

export const { crc32c } = requireNapi<Crc32>('@node-rs/crc32');
