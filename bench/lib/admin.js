// The benchmarks' view of a running storage system, through its admin API.

/** Resolves once every pair the storage system at 127.0.0.1:admin runs is in PAIR. */
export async function waitPairs(admin, ms = 180_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const s = await (await fetch(`http://127.0.0.1:${admin}/api/status`)).json();
    if (s.pairs.every((p) => p.state === 'PAIR')) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error('the pairs did not reach PAIR');
}
