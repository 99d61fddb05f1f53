// The benchmarks' view of a running storage system, through its admin API.

// The admin API wants a bearer token. A benchmark that imports this module before it starts its
// servers gives them (they inherit the environment) and itself the same one.
process.env.BLOCKMIRROR_ADMIN_TOKEN ??= `bench-${process.pid}-${Date.now()}`;

/**
 * Resolves once every pair the storage system at 127.0.0.1:admin runs is in PAIR. The admin API
 * wants the bearer token set above.
 */
export async function waitPairs(admin, ms = 180_000) {
  const deadline = Date.now() + ms;
  const token = process.env.BLOCKMIRROR_ADMIN_TOKEN;
  const headers = token ? { authorization: `Bearer ${token}` } : {};
  while (Date.now() < deadline) {
    let res;
    try {
      res = await fetch(`http://127.0.0.1:${admin}/api/status`, { headers });
    } catch (e) {
      // `up` answers on its NBD port (what startServer waits for) a moment before its admin API listens.
      if (e.cause?.code !== 'ECONNREFUSED') throw e;
      await new Promise((r) => setTimeout(r, 50));
      continue;
    }
    if (!res.ok) throw new Error(`admin status: HTTP ${res.status}${token ? '' : ' (is BLOCKMIRROR_ADMIN_TOKEN set?)'}`);
    const s = await res.json();
    if (s.pairs.every((p) => p.state === 'PAIR')) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error('the pairs did not reach PAIR');
}
