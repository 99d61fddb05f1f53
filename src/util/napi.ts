// napi-rs packages (@node-rs/crc32, @node-rs/xxhash) pick their platform binary when loaded: the
// loader reads /usr/bin/ldd to tell glibc from musl, tries a binary beside itself, then requires the
// platform package and reads its package.json to compare versions. That was 4-8 ms of CPU per
// package in every CLI process that checksums (xfer, cfs), on top of the binary's own dlopen.
// On Linux x64 the glibc binary's package is required directly; where it is missing or does not
// load (musl, another platform), the package's own loader decides as before.
import { createRequire } from 'node:module';

const req = createRequire(import.meta.url);

export function requireNapi<T>(pkg: string): T {
  if (process.platform === 'linux' && process.arch === 'x64') {
    try {
      return req(`${pkg}-linux-x64-gnu`) as T;
    } catch {
      // Not installed here, or not a glibc system: the loader below knows.
    }
  }
  return req(pkg) as T;
}
