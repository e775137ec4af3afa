"""The modules (layer 3): block anatomy and every fusability rule (anatomy), eval-mode folding
(folding), the per-call plan (plan), the drop-in conv + BN (+ ReLU) modules (modules) and the
fused ResNet blocks (blocks). Built on fastres.ops; fastres.convert builds on it."""
