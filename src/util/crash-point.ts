// Crash points, for tests of what a kill -9 at one exact moment leaves on disk (as etcd's gofail
// and TiKV's fail-rs do): with BLOCKMIRROR_CRASH_AT=NAME in its environment, the process kills
// itself with SIGKILL when it reaches the point NAME. Without it (always, outside such tests) a
// point costs one comparison.
//
//   point                       where                                     what a restart must see
//   reshape:old-closed          RemotePair.reshape, old pair closed       the old pair, with its bits
//   reshape:bitmap-replaced     RemotePair.reshape, new bitmap renamed    either membership, each with its bits
//                               in, before the new pair runs              (a new mirror all Invalid)
//   rebuild:old-closed          StorageSystem.replaceLocalPair, old       the same, for a pair inside one
//                               pair closed                               storage system
//   rebuild:bitmap-replaced     LocalPair.open of the rebuilt pair,       the same
//                               new bitmap renamed in
const armed = process.env.BLOCKMIRROR_CRASH_AT;

export function crashPoint(name: string): void {
  if (armed === name) process.kill(process.pid, 'SIGKILL');
}
