// A real OpenID provider for Flotilla's identity tests: panva's oidc-provider (OpenID
// certified) on loopback, with two users in different groups and the clients the tests use.
// Each start makes a new signing key with a new `kid` (a restart on the same port is a key
// rotation). The login page is a plain form that a test drives as a browser would.
//
//   PORT=N [ID_TOKEN_TTL=seconds] node provider.mjs     prints "ready <issuer>" when serving
//
// Users: alice (alice@example.com, group dev), bob (bob@example.com, group ops); any password.
// Clients: flotilla and other (public, PKCE, loopback redirects, device flow, refresh tokens),
// and flotilla-ui for the web UI when UI_REDIRECT_URIS is set.

import http from 'node:http';
import crypto from 'node:crypto';
import { URLSearchParams } from 'node:url';
import Provider from 'oidc-provider';

const port = Number(process.env.PORT || 0);
const issuer = `http://127.0.0.1:${port}`;
const idTokenTtl = Number(process.env.ID_TOKEN_TTL || 300);

const users = {
  alice: { email: 'alice@example.com', groups: ['dev'] },
  bob: { email: 'bob@example.com', groups: ['ops'] },
};

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), use: 'sig', alg: 'RS256' };

const client = (id) => ({
  client_id: id,
  application_type: 'native',
  token_endpoint_auth_method: 'none',
  redirect_uris: ['http://127.0.0.1/callback'],
  grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
  response_types: ['code'],
});

// The web UI signs in from the browser: a public web client whose redirect URIs the test
// gives (UI_REDIRECT_URIS, comma-separated), allowed to call the token endpoint from their
// origins (CORS), as Keycloak's "web origins" allow.
const uiRedirects = (process.env.UI_REDIRECT_URIS || '').split(',').filter(Boolean);
const webClients = uiRedirects.length ? [{
  client_id: 'flotilla-ui',
  application_type: 'web',
  token_endpoint_auth_method: 'none',
  redirect_uris: uiRedirects,
  grant_types: ['authorization_code'],
  response_types: ['code'],
}] : [];

const provider = new Provider(issuer, {
  clients: [client('flotilla'), client('other'), ...webClients],
  clientBasedCORS: (ctx, origin, c) => (c.redirectUris || []).some((u) => new URL(u).origin === origin),
  jwks: { keys: [jwk] },
  scopes: ['openid', 'email', 'groups', 'offline_access'],
  claims: { email: ['email', 'email_verified'], groups: ['groups'] },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
  },
  pkce: { required: () => true },
  // Scope claims (email, groups) in the ID token itself, as Keycloak and Dex put them.
  conformIdTokenClaims: false,
  ttl: { IdToken: idTokenTtl, AccessToken: idTokenTtl, DeviceCode: 300, Interaction: 300, Session: 3600, Grant: 3600, RefreshToken: 3600 },
  cookies: { keys: ['flotilla-test-only'] },
  // Refresh tokens for every client that asks for offline_access.
  issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
  async findAccount(ctx, id) {
    const user = users[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: user.email, email_verified: true, groups: user.groups };
      },
    };
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  renderError: async (ctx, out) => {
    ctx.type = 'text/plain';
    ctx.body = `error: ${out.error}: ${out.error_description || ''}`;
  },
});
provider.proxy = false;

const escape = (s) => String(s).replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);

function readBody(req) {
  return new Promise((resolve) => {
    let data = '';
    req.on('data', (chunk) => { data += chunk; if (data.length > 65536) req.destroy(); });
    req.on('end', () => resolve(new URLSearchParams(data)));
  });
}

// The login page: GET shows a form; POST logs the user in and grants what the client asked.
async function interaction(req, res) {
  const uid = req.url.split('/')[2]?.split('?')[0];
  try {
    const details = await provider.interactionDetails(req, res);
    if (req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(`<!doctype html><title>Sign in</title><form method="post" action="/interaction/${escape(uid)}">` +
        `<input name="login"><input name="password" type="password"><button>Sign in</button></form>`);
      return;
    }
    const form = await readBody(req);
    const accountId = form.get('login');
    if (!users[accountId]) {
      res.writeHead(403, { 'content-type': 'text/plain' });
      res.end('unknown user');
      return;
    }
    const { params, prompt } = details;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    else grant.addOIDCScope(String(params.scope));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { login: { accountId }, consent: { grantId } }, { mergeWithLastSubmission: false });
  } catch (err) {
    res.writeHead(400, { 'content-type': 'text/plain' });
    res.end(`interaction failed: ${err.message}`);
  }
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) return interaction(req, res);
  return callback(req, res);
});
server.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
