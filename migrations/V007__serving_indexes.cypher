// Serving: trending reads items in order of their degree (the sum of their positive edge weights,
// which is their time-decayed popularity up to one factor common to all items), and the filters
// select items by category and price.
CREATE INDEX item_deg IF NOT EXISTS FOR (i:Item) ON (i.ig_deg);
CREATE INDEX item_category IF NOT EXISTS FOR (i:Item) ON (i.category);
CREATE INDEX item_price IF NOT EXISTS FOR (i:Item) ON (i.price);
