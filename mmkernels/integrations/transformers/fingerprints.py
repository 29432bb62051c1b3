"""The fingerprints of the transformers code that mmkernels' patches mirror, for every transformers
release the test suite passed on: upstream name -> {fingerprint: releases}. Written by
`python -m mmkernels.integrations.transformers.compat record` (see compat.py); edit only through it."""

RECORDED = {
    'transformers.masking_utils:bidirectional_mask_function': {
        '571d9c530b0b71cc': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.masking_utils:causal_mask_function': {
        'a26140ea2745ddd6': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.masking_utils:create_bidirectional_mask': {
        '5949bc7cc46ca986': ('5.7.0',),
        '491b4f76df52fd52': ('5.17.0',),
        '251a88ef9c437ef2': ('5.24.0',),
        '1fb0b69ea963b00d': ('5.25.0',),
    },
    'transformers.masking_utils:create_causal_mask': {
        '91537b89a998f7fb': ('5.7.0',),
        'ce65180b17f27359': ('5.17.0',),
        '112c95e2843660c0': ('5.24.0',),
        '34e2a390ddd724ab': ('5.25.0',),
    },
    'transformers.masking_utils:sdpa_mask': {
        '57507f564b19d3f6': ('5.7.0',),
        'ef7a91049d654afe': ('5.17.0',),
        'fbd78fdf9705a493': ('5.24.0', '5.25.0',),
    },
    'transformers.models.blip.modeling_blip:BlipAttention.__init__': {
        'bd669601f0350751': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.blip.modeling_blip:BlipAttention.forward': {
        '23716dc54a26df7c': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.blip.modeling_blip:BlipModel.forward': {
        '3abedfd7bde6bc81': ('5.7.0', '5.17.0',),
        '2d25aa59c4d720c0': ('5.24.0', '5.25.0',),
    },
    'transformers.models.blip.modeling_blip:contrastive_loss': {
        '6dd51398164c11ce': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.blip.modeling_blip:image_text_contrastive_loss': {
        '844283d7827ca8af': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.blip.modeling_blip_text:BlipTextSelfAttention.__init__': {
        'c9b4e288177a0afa': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.blip.modeling_blip_text:BlipTextSelfAttention.forward': {
        '96bc9a0e09dc9c34': ('5.7.0', '5.17.0',),
        '4604bd0e61687452': ('5.24.0', '5.25.0',),
    },
    'transformers.models.bridgetower.modeling_bridgetower:BridgeTowerCrossAttention.__init__': {
        'dcd33ee22378f319': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.bridgetower.modeling_bridgetower:BridgeTowerCrossAttention.forward': {
        '23fabd0a1cf0859f': ('5.7.0', '5.17.0',),
        '3ae54bd535b1b400': ('5.24.0', '5.25.0',),
    },
    'transformers.models.bridgetower.modeling_bridgetower:BridgeTowerForContrastiveLearning.forward': {
        'f1bb5fcaa980ed70': ('5.7.0', '5.17.0',),
        'fe94914fa38785a8': ('5.24.0', '5.25.0',),
    },
    'transformers.models.bridgetower.modeling_bridgetower:BridgeTowerModel.forward': {
        'f19aa56ee958edae': ('5.7.0',),
        'b63de7e2e09a74ad': ('5.17.0',),
        '130d30c11a7e9f1c': ('5.24.0', '5.25.0',),
    },
    'transformers.models.bridgetower.modeling_bridgetower:BridgeTowerSelfAttention.__init__': {
        'ab3da0440724686d': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.bridgetower.modeling_bridgetower:BridgeTowerSelfAttention.forward': {
        '001ebe3b94e40f19': ('5.7.0', '5.17.0',),
        '10fcc88809f99147': ('5.24.0', '5.25.0',),
    },
    'transformers.models.bridgetower.modeling_bridgetower:BridgeTowerTextModel._create_attention_masks': {
        '07c8e4dcee8bea40': ('5.7.0', '5.17.0',),
        '41eecb27bf36e905': ('5.24.0',),
        '6082aba2c9e6e6f5': ('5.25.0',),
    },
    'transformers.models.bridgetower.modeling_bridgetower:eager_attention_forward': {
        'e5a30661ec0352bb': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:CLIPAttention.__init__': {
        'ece45046f29117b9': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:CLIPAttention.forward': {
        'ae2813ba1dbadeb3': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:CLIPModel.forward': {
        'e1ec31f8e910c69b': ('5.7.0', '5.17.0',),
        '9cb332c4aa58feba': ('5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:CLIPModel.get_image_features': {
        '96bd24971f256c59': ('5.7.0', '5.17.0',),
        '0c03020c5854d475': ('5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:CLIPModel.get_text_features': {
        'd9f4f911db691807': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:CLIPTextModel.forward': {
        '1ba21c1191513140': ('5.7.0', '5.17.0',),
        'b36e4827d3dea46b': ('5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:_get_vector_norm': {
        '358347e4f399f055': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:contrastive_loss': {
        '6dd51398164c11ce': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:eager_attention_forward': {
        'd8d5618fe8565dd6': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.clip.modeling_clip:image_text_contrastive_loss': {
        '844283d7827ca8af': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.flava.modeling_flava:FlavaForPreTraining.forward': {
        '47e7819ca691a6ff': ('5.7.0',),
        'e2ea36bda5611305': ('5.17.0',),
        '9abb7ea941f97dd9': ('5.24.0', '5.25.0',),
    },
    'transformers.models.flava.modeling_flava:FlavaSelfAttention.__init__': {
        '4a2bbdbb8f709ac0': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.flava.modeling_flava:FlavaSelfAttention.forward': {
        'b12ee0f9297ea286': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.lxmert.modeling_lxmert:LxmertAttention.__init__': {
        'bf6d9b6f66e98040': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.lxmert.modeling_lxmert:LxmertAttention.forward': {
        'e6aca12f8fd91c69': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip.modeling_siglip:SiglipAttention.__init__': {
        '52ceb673cab93e4e': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip.modeling_siglip:SiglipAttention.forward': {
        '9419ff94618fa3c3': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip.modeling_siglip:SiglipModel.forward': {
        '45c93b02a3421fde': ('5.7.0', '5.17.0',),
        '64e77f663a8d0708': ('5.24.0', '5.25.0',),
    },
    'transformers.models.siglip.modeling_siglip:SiglipMultiheadAttentionPoolingHead.forward': {
        '5cce51a348d6b482': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip.modeling_siglip:SiglipTextModel.forward': {
        '8f5b34293b1bf2c3': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip.modeling_siglip:eager_attention_forward': {
        '314da9c73353ef10': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip2.modeling_siglip2:Siglip2Attention.__init__': {
        '52ceb673cab93e4e': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip2.modeling_siglip2:Siglip2Attention.forward': {
        '9419ff94618fa3c3': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip2.modeling_siglip2:Siglip2Model.forward': {
        '48c157092d577bf7': ('5.7.0', '5.17.0',),
        '5beadd7955b88899': ('5.24.0', '5.25.0',),
    },
    'transformers.models.siglip2.modeling_siglip2:Siglip2MultiheadAttentionPoolingHead.forward': {
        '34c02e0a5d1a15d2': ('5.7.0',),
        '846c659401e4f1df': ('5.17.0', '5.24.0',),
        'b9c689436c09a473': ('5.25.0',),
    },
    'transformers.models.siglip2.modeling_siglip2:Siglip2TextModel.forward': {
        '8f5b34293b1bf2c3': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.siglip2.modeling_siglip2:Siglip2VisionModel.forward': {
        '16dfcdea952b6214': ('5.7.0', '5.17.0',),
        '51ff5b802e0229ff': ('5.24.0', '5.25.0',),
    },
    'transformers.models.siglip2.modeling_siglip2:eager_attention_forward': {
        '314da9c73353ef10': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.vilt.modeling_vilt:ViltSelfAttention.__init__': {
        '88b76cd56d03069e': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.vilt.modeling_vilt:ViltSelfAttention.forward': {
        'e1ef21b40f56e3da': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.visual_bert.modeling_visual_bert:VisualBertSelfAttention.__init__': {
        'f5e337413bbff7cb': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
    'transformers.models.visual_bert.modeling_visual_bert:VisualBertSelfAttention.forward': {
        '5125f958d00ec300': ('5.7.0', '5.17.0', '5.24.0', '5.25.0',),
    },
}
