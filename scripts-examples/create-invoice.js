// Reacts to `invoice.requested` (published by order-created): calls the billing API at the
// URL kept in the tenant's key-value store, with the tenant's API key from its secrets. A
// failing API is retried with backoff; the key never appears in run records.
export default async function (event, ctx) {
  const url = await ctx.kv.get("config:billing-url");
  if (!url) throw new Error("no billing URL: set config:billing-url in the tenant's key-value store");
  const key = await ctx.secrets.get("billing-api-key");
  if (!key) throw new Error("no billing-api-key secret: `scriptd secrets set acme billing-api-key`");
  const response = await fetch(`${url}/invoices`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
    body: JSON.stringify(event.data),
  });
  if (!response.ok) throw new Error(`the billing API answered ${response.status}`);
  const invoice = await response.json();
  console.info("invoice", invoice.id, "for order", event.data.order);
  return invoice;
}
