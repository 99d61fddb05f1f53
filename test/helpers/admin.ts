// fetch() against an admin API started by the suite, with the suite's token (setup-env.ts).
export function adminFetch(url: string, init: RequestInit = {}): Promise<Response> {
  const token = process.env.BLOCKMIRROR_ADMIN_TOKEN;
  if (!token) throw new Error('BLOCKMIRROR_ADMIN_TOKEN is not set: test/helpers/setup-env.ts should have set it');
  return fetch(url, { ...init, headers: { ...(init.headers as Record<string, string> | undefined), authorization: `Bearer ${token}` } });
}

/** The cache memory counters of the storage system whose admin API is on 127.0.0.1:`port`. */
export async function cacheStatus(port: number): Promise<{ dirtyBytes: number; bypass: number; bypassedBytes: number }> {
  const s = (await (await adminFetch(`http://127.0.0.1:${port}/api/status`)).json()) as { storageSystems: { cache: { dirtyBytes: number; bypass: number; bypassedBytes: number } }[] };
  return s.storageSystems[0]!.cache;
}
