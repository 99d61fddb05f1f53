// xxHash64 (@node-rs/xxhash) for checksums of bulk data, where CRC32C's cost shows: over 4 MiB
// buffers it took ~270 ms of CPU per GiB here, xxHash64 ~85 (bench/RESULTS.md, "xfer, issue 17 third part").
// Loaded with require() for the start-up reason given in crc32c.ts.
import { requireNapi } from './napi.js';

type XxHash = typeof import('@node-rs/xxhash');

const { xxh64 } = requireNapi<XxHash>('@node-rs/xxhash');

/** The low 32 bits of the xxHash64 (seed 0) of `buf`. */
export function xxh64Low(buf: Uint8Array): number {
  return Number(xxh64(buf) & 0xffffffffn);
}
