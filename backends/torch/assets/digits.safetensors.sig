{
  "format": "maas-gateway-signature",
  "version": 1,
  "algorithm": "ed25519",
  "name": "digits.safetensors",
  "sha256": "98a08012dd7e83605cf880e1c9d5e3476f010f2d08384ad7de539237e895472b",
  "key_id": "c91ec3368538717b",
  "signature": "1SfrZxpfCqbLuLdi1g2D8tCKFom4JKUOBFnT09VgnedQcci54ndAuzZl1OlOoTwe+0q9yXr3FmUOnhWF8XliBA=="
}
