// The web UI end to end: Debian's Chromium (playwright-core) against a real `flotilla up`
// with real QEMU tiny guests. Screenshots of each main view go to target/ui-screenshots.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { browser, call, eventually, screenshot, signedIn, startFlotilla, stopFlotilla, tinyGuest } from "./harness.mjs";

const VMS = "/apis/flotilla.dev/v1alpha1/namespaces/default/virtualmachines";
let flotilla;
let chromium;
let page;
let guest;

before(async () => {
  guest = tinyGuest();
  flotilla = await startFlotilla();
  chromium = await browser();
});

after(async () => {
  await chromium?.close();
  await stopFlotilla(flotilla);
});

const vmName = (n) => `${flotilla.tag}-${n}`;
const phaseOf = (name) => page.locator(`tr[data-name="${name}"] td[data-column="phase"]`);

test("a person signs in with a token and sees the VM list", async () => {
  page = await signedIn(chromium, flotilla);
  await page.getByText("No virtual machines in default").waitFor();
  // A wrong token is refused with words, not a blank page.
  const other = await chromium.newPage({ ignoreHTTPSErrors: true });
  await other.goto(`${flotilla.url}/ui/`);
  await other.getByLabel("Token").fill("flt.nope.nope");
  await other.getByRole("button", { name: "Sign in with a token" }).click();
  await other.getByRole("alert").filter({ hasText: "not valid" }).waitFor();
  await other.close();
});

test("a VM created in the wizard goes Running without a reload", async () => {
  const name = vmName("wizard");
  await page.getByRole("link", { name: "Create VM" }).click();
  await page.getByLabel("Name").fill(name);
  await page.getByLabel("CPUs", { exact: true }).fill("1");
  await page.getByLabel("Memory", { exact: true }).fill("256Mi");
  await screenshot(page, "wizard");
  await page.getByRole("button", { name: "Next" }).click();
  await page.getByLabel("A kernel on the node").check();
  await page.getByLabel("Kernel", { exact: true }).fill(`${guest}/vmlinuz`);
  await page.getByLabel("Initrd").fill(`${guest}/initramfs.gz`);
  await page.getByLabel("Kernel command line").fill("console=tty0 console=ttyS0 panic=-1");
  await page.getByLabel("Root disk size").fill("32Mi");
  await page.getByRole("button", { name: "Next" }).click();
  await page.getByRole("button", { name: "Next" }).click();
  const yaml = await page.getByTestId("yaml-preview").textContent();
  assert.match(yaml, new RegExp(`name: ${name}`));
  assert.match(yaml, /powerState: Running/);
  await screenshot(page, "wizard-review");
  await page.getByRole("button", { name: "Create and start" }).click();
  await page.waitForURL(`**/ui/p/default/virtualmachines/${name}`);
  await page.locator(".title .phase", { hasText: "Running" }).waitFor({ timeout: 120_000 });
  await screenshot(page, "vm-overview");
});

test("a VM created through the API appears in the open list", async () => {
  await page.getByRole("link", { name: "Virtual machines" }).click();
  const name = vmName("api");
  await call(flotilla, "POST", VMS, {
    metadata: { name },
    spec: {
      powerState: "Running",
      resources: { cpus: 1, memory: "256Mi" },
      boot: { kernel: `${guest}/vmlinuz`, initrd: `${guest}/initramfs.gz`, cmdline: "console=ttyS0 panic=-1" },
      rootDisk: { size: "32Mi" },
    },
  });
  await page.locator(`tr[data-name="${name}"]`).waitFor({ timeout: 15_000 });
  await phaseOf(name).filter({ hasText: "Running" }).waitFor({ timeout: 120_000 });
  await screenshot(page, "vm-list");
});

test("the serial console shows the guest and runs a typed command", async () => {
  const name = vmName("wizard");
  await page.goto(`${flotilla.url}/ui/p/default/virtualmachines/${name}/console`);
  await page.locator('.console-state[data-state="connected"]').waitFor({ timeout: 30_000 });
  const terminal = page.getByTestId("serial-console");
  await eventually("the guest's boot output shows", 60, async () => /FLOTILLA-BOOTED/.test(await terminal.innerText()));
  await terminal.click();
  await page.keyboard.type("echo typed-$((7*6))\n");
  await eventually("the guest answers", 60, async () => /typed-42/.test(await terminal.innerText()));
  await screenshot(page, "serial-console");
});

test("the VNC console connects and draws the screen", async () => {
  const name = vmName("wizard");
  await page.goto(`${flotilla.url}/ui/p/default/virtualmachines/${name}/vnc`);
  await page.locator('.console-state[data-state="connected"]').waitFor({ timeout: 30_000 });
  const lit = await eventually("the canvas is not blank", 60, async () =>
    page.evaluate(() => {
      const canvas = document.querySelector('[data-testid="vnc-screen"] canvas');
      if (!canvas || canvas.width === 0) return 0;
      const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      let bright = 0;
      for (let i = 0; i < data.length; i += 4) if (data[i] + data[i + 1] + data[i + 2] > 150) bright++;
      return bright;
    }),
  );
  assert.ok(lit > 100, `${lit} lit pixels`);
  await screenshot(page, "vnc-console");
});

test("a console WebSocket without valid credentials is refused", async () => {
  const name = vmName("wizard");
  const outcome = await page.evaluate(async (path) => {
    const attempt = (url) =>
      new Promise((ok) => {
        const ws = new WebSocket(url);
        ws.onopen = () => ok("opened");
        ws.onerror = () => ok("refused");
      });
    const base = `wss://${location.host}${path}`;
    return [await attempt(base), await attempt(`${base}?ticket=${"0".repeat(64)}`)];
  }, `${VMS}/${name}/console`);
  assert.deepEqual(outcome, ["refused", "refused"]);
});

test("deep links to each tab survive a reload", async () => {
  const name = vmName("wizard");
  for (const [tab, shows] of [
    ["overview", "Conditions"],
    ["events", "Reason"],
    ["log", "FLOTILLA-BOOTED"],
    ["console", "Serial console:"],
    ["vnc", "VNC:"],
  ]) {
    await page.goto(`${flotilla.url}/ui/p/default/virtualmachines/${name}/${tab}`);
    await page.reload();
    await page.getByRole("tab", { name: /./, selected: true }).waitFor();
    await page.getByText(shows).first().waitFor({ timeout: 30_000 });
    assert.equal(new URL(page.url()).pathname, `/ui/p/default/virtualmachines/${name}/${tab}`);
    if (tab === "events") await screenshot(page, "vm-events");
  }
  await page.goto(`${flotilla.url}/ui/nodes`);
  await page.locator(`tr[data-name="${flotilla.node}"]`).getByText("Ready").waitFor();
  await screenshot(page, "nodes");
});

test("a validation error shows next to its field, with the values kept", async () => {
  await page.goto(`${flotilla.url}/ui/p/default/virtualmachines/new`);
  await page.getByLabel("Name").fill(vmName("bad"));
  await page.getByLabel("Memory", { exact: true }).fill("lots");
  for (let i = 0; i < 3; i++) await page.getByRole("button", { name: "Next" }).click();
  await page.getByRole("button", { name: "Create and start" }).click();
  const problem = page.locator('.field-error[data-field="memory"]');
  await problem.waitFor();
  assert.match(await problem.textContent(), /memory|quantity/i);
  assert.equal(await page.getByLabel("Name").inputValue(), vmName("bad"));
  await screenshot(page, "wizard-error");
});

test("bulk stop stops every selected VM behind a confirmation", async () => {
  await page.goto(`${flotilla.url}/ui/p/default/virtualmachines`);
  await page.getByLabel("Select all").check();
  await page.locator(".bulk").getByRole("button", { name: "Stop" }).click();
  await page.getByRole("dialog").getByRole("button", { name: "Stop" }).click();
  for (const n of ["wizard", "api"]) {
    await phaseOf(vmName(n)).filter({ hasText: "Stopped" }).waitFor({ timeout: 120_000 });
  }
  const vms = await call(flotilla, "GET", VMS);
  assert.deepEqual(
    vms.items.map((v) => v.spec.powerState),
    vms.items.map(() => "Stopped"),
  );
});

test("the list filters, sorts and shows chosen columns; the project switcher changes the URL", async () => {
  await page.goto(`${flotilla.url}/ui/p/default/virtualmachines`);
  const rows = page.locator("tbody tr");
  await rows.nth(1).waitFor();
  await page.getByLabel("Filter").fill("api");
  await assertEventually(async () => (await rows.count()) === 1 && (await rows.first().getAttribute("data-name")) === vmName("api"));
  await page.getByLabel("Filter").fill("");
  await page.getByRole("columnheader", { name: /^Name/ }).click(); // descending now
  await assertEventually(async () => (await rows.first().getAttribute("data-name")) === vmName("wizard"));
  await page.getByRole("columnheader", { name: /^Name/ }).click();
  await assertEventually(async () => (await rows.first().getAttribute("data-name")) === vmName("api"));
  assert.equal(await page.getByRole("columnheader", { name: /^Power/ }).count(), 0);
  await page.getByRole("button", { name: "Columns" }).click();
  await page.getByRole("menu").getByLabel("Power").check();
  await page.getByRole("columnheader", { name: /^Power/ }).waitFor();
  // The choice is kept across a reload.
  await page.reload();
  await page.getByRole("columnheader", { name: /^Power/ }).waitFor();
  await call(flotilla, "POST", "/apis/flotilla.dev/v1alpha1/projects", { metadata: { name: `${flotilla.tag}-other` } });
  await page.getByLabel("Project").locator(`option[value="${flotilla.tag}-other"]`).waitFor({ state: "attached" });
  await page.getByLabel("Project").selectOption(`${flotilla.tag}-other`);
  await page.waitForURL(`**/ui/p/${flotilla.tag}-other/virtualmachines`);
  await page.getByText(`No virtual machines in ${flotilla.tag}-other`).waitFor();
});

test("a node is cordoned and uncordoned from the node view", async () => {
  await page.goto(`${flotilla.url}/ui/nodes/${flotilla.node}`);
  const row = page.locator(`tr[data-name="${flotilla.node}"]`);
  await row.getByRole("button", { name: "Cordon" }).click();
  await row.getByText("cordoned").waitFor();
  const node = await call(flotilla, "GET", `/apis/flotilla.dev/v1alpha1/nodes/${flotilla.node}`);
  assert.equal(node.spec.unschedulable, true);
  await row.getByRole("button", { name: "Uncordon" }).click();
  await row.getByRole("button", { name: "Cordon" }).waitFor();
  const again = await call(flotilla, "GET", `/apis/flotilla.dev/v1alpha1/nodes/${flotilla.node}`);
  assert.ok(!again.spec?.unschedulable);
});

async function assertEventually(check) {
  await eventually("the list shows it", 10, check);
}

test("images are listed with their source and their state on each node", async () => {
  const name = vmName("img");
  await call(flotilla, "POST", "/apis/flotilla.dev/v1alpha1/namespaces/default/images", {
    metadata: { name },
    spec: { source: { path: `${guest}/initramfs.gz` }, format: "raw" },
  });
  // (The project switcher chose another project earlier: the UI remembers it.)
  await page.goto(`${flotilla.url}/ui/p/default/images`);
  const row = page.locator(`tr[data-name="${name}"]`);
  await row.waitFor();
  assert.equal(await row.locator('td[data-column="source"]').textContent(), `${guest}/initramfs.gz`);
  // Per node: the node's phase and name once its agent reports, until then a note saying so.
  const states = row.locator('td[data-column="nodes"]');
  await eventually("the image's node state shows", 30, async () => {
    const text = await states.textContent();
    return text.includes(flotilla.node) || text.includes("not on any node yet");
  });
  await screenshot(page, "images");
});
