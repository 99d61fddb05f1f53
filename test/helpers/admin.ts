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

/**
 * Two storage systems, each with cache memory and a sync pair inside it: `mem` (vol5 → vol6,
 * memory volumes) in 1 and `files` (vol5 → vol6, files under data2) in 2, on loopback.
 */
export function cachedSyncPairsYaml(p: { nbd1: number; admin1: number; nbd2: number; admin2: number }, cache: string, size: string): string {
  const ss = (id: 1 | 2, nbd: number, admin: number) => `  - id: ${id}
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
${id === 2 ? '    dataDir: data2\n' : ''}    cache: ${cache}
    volumes:
      - { id: 5, size: ${size} }
      - { id: 6, size: ${size} }
`;
  return `clusterSize: 64KiB
storageSystems:
${ss(1, p.nbd1, p.admin1)}${ss(2, p.nbd2, p.admin2)}pairs:
  - { name: mem, mode: sync, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 1, vol: 6 } ] }
  - { name: files, mode: sync, master: { ss: 2, vol: 5 }, mirrors: [ { ss: 2, vol: 6 } ] }
`;
}
