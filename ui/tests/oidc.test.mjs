// Signing in to the web UI with OIDC: a real OpenID provider (tests/oidc, panva's
// oidc-provider), the authorization code flow with PKCE run by the page, and the ID token
// used as the bearer token for the API (RBAC applies: alice is a member of project default).

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { browser, call, freePort, screenshot, startFlotilla, stopFlotilla, REPO } from "./harness.mjs";

let provider;
let flotilla;
let chromium;

after(async () => {
  await chromium?.close();
  await stopFlotilla(flotilla);
  provider?.kill("SIGKILL");
});

async function startProvider(redirect) {
  const child = spawn("node", [join(REPO, "tests/oidc/provider.mjs")], {
    env: { ...process.env, PORT: String(await freePort()), UI_REDIRECT_URIS: redirect },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const issuer = await new Promise((ok, fail) => {
    let out = "";
    child.stdout.on("data", (c) => {
      out += c;
      const m = /ready (\S+)/.exec(out);
      if (m) ok(m[1]);
    });
    child.on("exit", (code) => fail(new Error(`the OpenID provider exited (${code})`)));
  });
  return { child, issuer };
}

test("a person signs in with the OIDC issuer and works as that user", async () => {
  const port = await freePort();
  let issuer;
  ({ child: provider, issuer } = await startProvider(`https://127.0.0.1:${port}/ui/callback`));
  flotilla = await startFlotilla({
    agent: false,
    port,
    extra: ["--oidc-issuer", issuer, "--oidc-client-id", "flotilla-ui"],
  });
  await call(flotilla, "POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings", {
    apiVersion: "rbac.authorization.k8s.io/v1",
    kind: "RoleBinding",
    metadata: { name: "alice-member" },
    roleRef: { apiGroup: "rbac.authorization.k8s.io", kind: "ClusterRole", name: "member" },
    subjects: [{ kind: "User", name: "alice@example.com" }],
  });
  chromium = await browser();
  const context = await chromium.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  await page.goto(`${flotilla.url}/ui/`);
  await page.getByRole("button", { name: /Sign in with 127\.0\.0\.1/ }).click();
  // The issuer's own login form.
  await page.locator('input[name="login"]').fill("alice");
  await page.locator('input[name="password"]').fill("any");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Virtual machines" }).waitFor();
  await page.getByText("No virtual machines in default").waitFor();
  await screenshot(page, "signed-in-with-oidc");
  // The API sees alice: she may create VMs in default, and nothing in another project.
  const token = await page.evaluate(() => sessionStorage.getItem("flotilla.token"));
  assert.equal(token.split(".").length, 3, "an ID token (a JWT)");
  await call(flotilla, "POST", "/apis/flotilla.dev/v1alpha1/projects", { metadata: { name: "elsewhere" } });
  const refused = await call({ ...flotilla, token }, "GET", "/apis/flotilla.dev/v1alpha1/namespaces/elsewhere/virtualmachines").catch((e) => e);
  assert.equal(refused.code, 403);
  assert.match(refused.message, /alice@example\.com/);
  await call({ ...flotilla, token }, "GET", "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines");
});
