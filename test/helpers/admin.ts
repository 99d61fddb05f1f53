// fetch() against an admin API started by the suite, with the suite's token (setup-env.ts).
export function adminFetch(url: string, init: RequestInit = {}): Promise<Response> {
  const token = process.env.BLOCKMIRROR_ADMIN_TOKEN;
  if (!token) throw new Error('BLOCKMIRROR_ADMIN_TOKEN is not set: test/helpers/setup-env.ts should have set it');
  return fetch(url, { ...init, headers: { ...(init.headers as Record<string, string> | undefined), authorization: `Bearer ${token}` } });
}
