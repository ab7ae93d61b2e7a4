// A real OpenID provider (panva's oidc-provider) for saslauthd-oidc tests.
//
//   node provider.mjs [PORT]        (or OIDC_PEER_PORT=...; 0 = any free port)
//
// Listens on 127.0.0.1 only, issuer http://127.0.0.1:<port>, and prints one
// line "READY <port>" on stdout once it accepts connections.  SIGTERM/SIGINT
// close the server and exit 0.  Started by tests/peers/oidc_provider.py.
//
// Client secrets come from OIDC_PEER_CLIENT_SECRETS (a JSON object
// client_id -> secret); a client missing there gets "<client_id>-secret".
//
// Clients (all confidential):
//   mail-webmail  client_secret_basic  client_credentials, authorization_code (+PKCE)
//   mail-desktop  client_secret_post   client_credentials
//   saslauthd     client_secret_basic  client_credentials (the daemon's introspection identity)
//
// Access tokens:
//   resource=urn:mail   -> JWT (typ at+jwt, ES256), aud "urn:mail", scope within "mail email"
//   resource=urn:other  -> JWT (typ at+jwt, RS256), aud "urn:other", scope within "other"
//   no resource         -> opaque; check it at /token/introspection
// Every access token carries an "email" claim (extraTokenClaims): the user's
// address for authorization_code tokens (alice@example.org), and
// "<client_id>@clients.example.org" for client_credentials tokens.
//
// authorization_code: /interaction/<uid> logs in alice@example.org and grants
// whatever was asked for, without any page (a script can follow the redirects).
//
// GET /__peer/counts answers {"<METHOD> <path>": n, ...}: how many requests
// each endpoint received so far (itself not counted), so tests can prove
// caching and single-flight by counting at the provider.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import process from 'node:process';

import Provider, { errors } from 'oidc-provider';

const HOST = '127.0.0.1';
const port = Number(process.argv[2] ?? process.env.OIDC_PEER_PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`bad port ${process.argv[2] ?? process.env.OIDC_PEER_PORT}`);
  process.exit(2);
}

const secrets = JSON.parse(process.env.OIDC_PEER_CLIENT_SECRETS || '{}');
const secretFor = (id) => secrets[id] ?? `${id}-secret`;

const ACCOUNTS = {
  alice: { email: 'alice@example.org', email_verified: true },
};

const RESOURCE_SERVERS = {
  'urn:mail': { scope: 'mail email', alg: 'ES256' },
  'urn:other': { scope: 'other', alg: 'RS256' },
};

function signingKey(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, alg, use: 'sig', kid: `${alg.toLowerCase()}-${crypto.randomUUID().slice(0, 8)}` };
}

const jwks = {
  keys: [
    // The first key signs ID tokens (RS256 is the client default).
    signingKey('rsa', { modulusLength: 2048 }, 'RS256'),
    signingKey('ec', { namedCurve: 'P-256' }, 'ES256'),
  ],
};

const redirectUri = 'http://127.0.0.1/callback';

const clients = [
  {
    client_id: 'mail-webmail',
    client_secret: secretFor('mail-webmail'),
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['client_credentials', 'authorization_code'],
    response_types: ['code'],
    redirect_uris: [redirectUri],
    scope: 'openid email mail other',
  },
  {
    client_id: 'mail-desktop',
    client_secret: secretFor('mail-desktop'),
    token_endpoint_auth_method: 'client_secret_post',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: 'email mail other',
  },
  {
    client_id: 'saslauthd',
    client_secret: secretFor('saslauthd'),
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  },
];

function configuration() {
  return {
    clients,
    jwks,
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access', 'email', 'mail', 'other'],
    claims: { openid: ['sub'], email: ['email', 'email_verified'] },
    async findAccount(_ctx, sub) {
      const account = ACCOUNTS[sub];
      if (!account) return undefined;
      return { accountId: sub, async claims() { return { sub, ...account }; } };
    },
    async extraTokenClaims(_ctx, token) {
      if (token.kind !== 'AccessToken' && token.kind !== 'ClientCredentials') return undefined;
      if (token.accountId) return { email: ACCOUNTS[token.accountId]?.email };
      return { email: `${token.clientId}@clients.example.org` };
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Any authenticated (confidential) client may introspect any token.
        allowedPolicy: async (_ctx, client) => client.clientAuthMethod !== 'none',
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (_ctx, _client, oneOf) => oneOf,
        useGrantedResource: async () => true,
        async getResourceServerInfo(_ctx, resourceIndicator) {
          const rs = RESOURCE_SERVERS[resourceIndicator];
          if (!rs) throw new errors.InvalidTarget();
          return {
            scope: rs.scope,
            audience: resourceIndicator,
            accessTokenFormat: 'jwt',
            accessTokenTTL: 600,
            jwt: { sign: { alg: rs.alg } },
          };
        },
      },
    },
    ttl: {
      AccessToken: 600,
      ClientCredentials: 600,
      AuthorizationCode: 60,
      IdToken: 600,
      Interaction: 300,
      Session: 3600,
      Grant: 3600,
    },
  };
}

// Scripted login + consent: no page, just the redirect back to /auth/<uid>.
function autoInteraction(provider) {
  return async (ctx, next) => {
    if (!ctx.path.startsWith('/interaction/')) return next();
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    const { prompt, params, session } = details;
    let result;
    if (prompt.name === 'login') {
      result = { login: { accountId: 'alice' } };
    } else if (prompt.name === 'consent') {
      const grant = details.grantId
        ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
      const missing = prompt.details;
      if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
      if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
      for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
      result = { consent: { grantId: await grant.save() } };
    } else {
      result = { error: 'access_denied', error_description: `unexpected prompt ${prompt.name}` };
    }
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, {
      mergeWithLastSubmission: true,
    });
    ctx.status = 303;
    ctx.redirect(returnTo);
  };
}

let handler = (_req, res) => {
  res.statusCode = 503;
  res.end();
};
const counts = new Map();
const server = http.createServer((req, res) => {
  const path = (req.url ?? '/').split('?')[0];
  if (path === '/__peer/counts' && req.method === 'GET') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(Object.fromEntries(counts)));
    return;
  }
  const key = `${req.method} ${path}`;
  counts.set(key, (counts.get(key) ?? 0) + 1);
  handler(req, res);
});

server.listen(port, HOST, () => {
  const actual = server.address().port;
  const provider = new Provider(`http://${HOST}:${actual}`, configuration());
  provider.use(autoInteraction(provider));
  handler = provider.callback();
  process.stdout.write(`READY ${actual}\n`);
});

function stop(signal) {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
  console.error(`oidc-provider peer: ${signal}, stopping`);
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
