// Live reconfiguration over the admin API (cluster/reconfigure.ts): what `blockmirror apply`
// and `blockmirror pair create|delete` call on every storage system of the YAML.
//
//   GET  /api/config   { yaml }                         the YAML this process runs now, inline secrets
//                                                       (iscsiChap secret, mutualSecret) shown as "<redacted>"
//   POST /api/config   body { yaml, dryRun? }           { changes: string[], notes: string[], applied }
//                      400 the YAML is invalid (the line and column of each problem)
//                      409 a change is refused (unsafe, or needs a restart): nothing applied
//                      500 a change failed half way: the changes before it were undone
//
// A process started without a YAML (`serve`, tests) has none to change: 404.
import type { FastifyInstance } from 'fastify';
import * as z from 'zod';
import { isPair, isScalar, parseDocument, visit } from 'yaml';
import { ConfigError } from '../cluster/config.js';
import type { ApplyResult } from '../cluster/reconfigure.js';
import { ReconfigureFailed, ReconfigureRefused } from '../controller/reconfigure.js';
import { PairCommandError } from '../controller/status.js';

export interface ConfigHandler {
  currentText(): string;
  apply(text: string | undefined, opts: { dryRun: boolean }): Promise<ApplyResult>;
}

/** A YAML of a few thousand pairs fits; the other routes keep their 64 KiB limit. */
export const CONFIG_BODY_LIMIT = 4 * 1024 * 1024;

const ApplyBody = z.strictObject({ yaml: z.string().min(1), dryRun: z.boolean().optional() });

export function registerConfigRoutes(app: FastifyInstance, handler: ConfigHandler | undefined): void {
  const need = (): ConfigHandler => {
    if (!handler) throw new PairCommandError('not-found', 'this storage system was not started from a YAML (blockmirror up): it has no configuration to change');
    return handler;
  };
  // GET and POST share the path, so the 405 for the other methods is set here (server.ts's route() takes one method a path).
  app.route({ method: ['GET', 'HEAD'], url: '/api/config', handler: async () => ({ yaml: redactSecrets(need().currentText()) }) });
  app.route({
    method: 'POST',
    url: '/api/config',
    bodyLimit: CONFIG_BODY_LIMIT,
    handler: async (req, reply) => {
      const h = need();
      const body = ApplyBody.safeParse(req.body);
      if (!body.success) return reply.code(400).send({ error: `the body must be {"yaml": "...", "dryRun": true|false}: ${body.error.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ')}` });
      try {
        return await h.apply(body.data.yaml, { dryRun: body.data.dryRun === true });
      } catch (e) {
        // One line each; a ConfigError lists every problem, one per line.
        if (e instanceof ConfigError) return reply.code(400).send({ error: e.message });
        if (e instanceof ReconfigureRefused) return reply.code(409).send({ error: e.message });
        if (e instanceof ReconfigureFailed) return reply.code(500).send({ error: e.message });
        throw e;
      }
    },
  });
  app.route({
    method: ['PUT', 'PATCH', 'DELETE', 'OPTIONS'],
    url: '/api/config',
    handler: async (req, reply) => reply.code(405).header('allow', 'GET, HEAD, POST').send({ error: `method ${req.method} not allowed on /api/config (use GET or POST)` }),
  });
}

const SECRET_KEYS = new Set(['secret', 'mutualSecret']);

/**
 * The YAML with the CHAP secrets of `iscsiChap` mappings (docs/iscsi.md) replaced, comments and
 * layout kept: secrets never leave the process through the API (docs/SECURITY.md). A text that
 * does not parse is not served at all.
 */
export function redactSecrets(text: string): string {
  const doc = parseDocument(text);
  if (doc.errors.length > 0) return '# the running YAML does not parse; read it on the host\n';
  const isChap = (n: unknown) => isPair(n) && isScalar(n.key) && n.key.value === 'iscsiChap';
  visit(doc, {
    Pair(_, pair, ancestors) {
      if (isScalar(pair.key) && SECRET_KEYS.has(String(pair.key.value)) && ancestors.some(isChap)) pair.value = doc.createNode('<redacted>');
    },
  });
  return doc.toString();
}
